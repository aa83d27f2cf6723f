//! The embedded store's redo log (`embedded/redo.rs`): a batch is acknowledged only once its
//! record is durable, nothing a read returns is less durable than that, a failed log stops the
//! store instead of acknowledging what it could not keep, checkpoints empty the log, and
//! replay copes with a torn tail and refuses a damaged log.
//!
//! Replay after a real crash (SIGKILL mid-load) is in `loom-testkit/tests/crash_embedded.rs`
//! and in `loom-dev torture`.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{check, entry, id, journal, load};
use futures::TryStreamExt;
use loom_core::embedded::{DATA_FILE, REDO_FILE};
use loom_core::{EmbeddedOptions, EmbeddedStore, Entry, JournalStore, SeqRange, StoreError};
use loom_testkit::faults::{DiskFaults, FaultyRedo};
use serde_json::json;

/// These tests damage the files of partition 0 (`loom.redb`, `loom.redo`) by hand: their store
/// has that one partition.
fn one(dir: impl AsRef<std::path::Path>) -> loom_core::StoreResult<EmbeddedStore> {
    EmbeddedStore::open_with(
        dir,
        loom_core::EmbeddedOptions {
            partitions: Some(1),
            ..loom_core::EmbeddedOptions::default()
        },
    )
}

struct Handles {
    faults: Arc<DiskFaults>,
    hold: Arc<AtomicBool>,
    holding: Arc<AtomicBool>,
}

/// The store on a log whose faults the test arms. It stays failed after a failure (these tests
/// check the latch); reopening by itself is `full_disk.rs`'s.
fn open_faulty(dir: &std::path::Path) -> (EmbeddedStore, Handles) {
    let (tx, rx) = std::sync::mpsc::channel();
    let options = EmbeddedOptions {
        reopen_after_failure: false,
        ..EmbeddedOptions {
            partitions: Some(1),
            ..EmbeddedOptions::default()
        }
    };
    let store = EmbeddedStore::open_with_redo(dir, options, move |f| {
        let redo = FaultyRedo::new(f);
        // Only the first opening's handles are wanted (nobody listens after that).
        let _ = tx.send(Handles {
            faults: redo.faults.clone(),
            hold: redo.hold.clone(),
            holding: redo.holding.clone(),
        });
        Box::new(redo)
    })
    .expect("open");
    (store, rx.recv().expect("handles"))
}

async fn failed_log(arm: impl FnOnce(&DiskFaults)) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut acked = HashMap::new();
    {
        let (store, h) = open_faulty(dir.path());
        for _ in 0..5 {
            assert!(load(&store, &mut acked, 1).await.is_empty());
        }
        arm(&h.faults);
        let errors = load(&store, &mut acked, 1).await;
        assert!(h.faults.injected.load(Ordering::SeqCst) > 0, "never hit");
        assert!(
            !errors.is_empty(),
            "a batch the log could not keep was acknowledged"
        );
        for e in &errors {
            assert!(matches!(e, StoreError::Storage { .. }), "untyped: {e:?}");
        }
        // The store stays stopped: no later write is acknowledged, and no read returns what
        // may not survive, even though the disk works again.
        // Kept busy for longer than the idle checkpoint delay, as a live system would be.
        let until = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < until {
            let later = load(&store, &mut acked, 1).await;
            assert_eq!(
                later.len(),
                8,
                "a write after the log failed was acknowledged"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let read: Result<Vec<Entry>, _> = store.read(&id(0), SeqRange::all()).try_collect().await;
        assert!(matches!(read, Err(StoreError::Storage { .. })), "{read:?}");
        assert!(matches!(
            store.highest_seq(&id(0)).await,
            Err(StoreError::Storage { .. })
        ));
    }
    check(dir.path(), &acked).await;
    consistent(dir.path());
}

/// Read straight from the data file: each actor's journal holds exactly the seqs its meta row
/// says, so no replay put a meta row back under entries that stayed.
fn consistent(dir: &std::path::Path) {
    use redb::ReadableDatabase;
    let db = redb::Database::open(dir.join(DATA_FILE)).expect("redb");
    let txn = db.begin_read().expect("read");
    let meta = txn
        .open_table(loom_core::embedded::tables::JOURNAL_META)
        .expect("meta");
    let journal = txn
        .open_table(loom_core::embedded::tables::JOURNAL)
        .expect("journal");
    for n in 0..8 {
        let a = id(n);
        let (highest, trimmed) = meta
            .get(a.as_str())
            .expect("get")
            .map(|v| v.value())
            .unwrap_or((0, 0));
        let seqs: Vec<u64> = journal
            .range((a.as_str(), 0)..=(a.as_str(), u64::MAX))
            .expect("range")
            .map(|r| r.expect("row").0.value().1)
            .collect();
        assert_eq!(
            seqs,
            (trimmed + 1..=highest).collect::<Vec<_>>(),
            "actor {n}: the journal and its meta row disagree"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_log_sync_is_never_acknowledged_and_stops_the_store() {
    failed_log(|f| f.fail_syncs.store(1, Ordering::SeqCst)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_log_write_is_never_acknowledged_and_stops_the_store() {
    failed_log(|f| f.fail_writes.store(1, Ordering::SeqCst)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neither_the_writer_nor_a_reader_sees_a_batch_before_it_is_durable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, h) = open_faulty(dir.path());
    store
        .append(&id(0), 1, &[entry(0, 1)])
        .await
        .expect("append 1");
    h.hold.store(true, Ordering::SeqCst);
    let s = store.clone();
    let append = tokio::spawn(async move { s.append(&id(0), 2, &[entry(0, 2)]).await });
    // Wait until the batch is committed to redb and its record is being synced.
    let start = Instant::now();
    while !h.holding.load(Ordering::SeqCst) {
        assert!(start.elapsed() < Duration::from_secs(10), "never synced");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let s = store.clone();
    let highest = tokio::spawn(async move { s.highest_seq(&id(0)).await });
    let s = store.clone();
    let entries = tokio::spawn(async move {
        s.read(&id(0), SeqRange::all())
            .try_collect::<Vec<Entry>>()
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!append.is_finished(), "acknowledged before the log sync");
    assert!(
        !highest.is_finished() && !entries.is_finished(),
        "a read returned a batch that is not durable yet"
    );
    h.hold.store(false, Ordering::SeqCst);
    assert_eq!(append.await.expect("task").expect("append 2"), 2);
    assert_eq!(highest.await.expect("task").expect("highest"), 2);
    assert_eq!(entries.await.expect("task").expect("read").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_store_checkpoints_and_a_closed_one_needs_no_log() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join(REDO_FILE);
    let header = 8;
    {
        let store = one(dir.path()).expect("open");
        let entries: Vec<Entry> = (1..=50).map(|s| entry(1, s)).collect();
        store.append(&id(1), 1, &entries).await.expect("append");
        assert!(std::fs::metadata(&log).expect("log").len() > header);
        let start = Instant::now();
        while store.writer_stats().checkpoints == 0 {
            assert!(start.elapsed() < Duration::from_secs(10), "no checkpoint");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(std::fs::metadata(&log).expect("log").len(), header);
        store
            .append(&id(1), 51, &[entry(1, 51)])
            .await
            .expect("append");
    }
    // Closed: the last batches were checkpointed, the log is empty, and the data file alone
    // holds everything (read here with redb directly, not through the store).
    assert_eq!(std::fs::metadata(&log).expect("log").len(), header);
    let db = redb::Database::open(dir.path().join(DATA_FILE)).expect("redb");
    let txn = redb::ReadableDatabase::begin_read(&db).expect("read");
    let table = txn
        .open_table(loom_core::embedded::tables::JOURNAL)
        .expect("journal");
    let n = redb::ReadableTableMetadata::len(&table).expect("len");
    assert_eq!(n, 51);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_log_tail_is_dropped_and_a_damaged_log_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join(REDO_FILE);
    {
        let store = one(dir.path()).expect("open");
        store
            .append(&id(2), 1, &[entry(2, 1)])
            .await
            .expect("append");
    }
    // A record the crash cut short: a length, part of a checksum, nothing else.
    let mut bytes = std::fs::read(&log).expect("read log");
    bytes.extend_from_slice(&[200, 0, 0, 0, 7, 7]);
    std::fs::write(&log, &bytes).expect("write log");
    {
        let store = one(dir.path()).expect("a torn tail is not damage");
        assert_eq!(journal(&store, 2).await.len(), 1);
        // The dropped bytes are kept beside the log for whoever investigates.
        let kept: Vec<Vec<u8>> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("loom.redo.torn-")
            })
            .map(|e| std::fs::read(e.path()).expect("read kept tail"))
            .collect();
        assert_eq!(kept, vec![vec![200, 0, 0, 0, 7, 7]]);
        store
            .append(&id(2), 2, &[entry(2, 2)])
            .await
            .expect("append");
    }
    // Not a redo log at all: refused, and left as found for whoever investigates.
    std::fs::write(&log, b"something else entirely").expect("write log");
    match one(dir.path()) {
        Err(StoreError::Corrupt { .. }) => {}
        Ok(_) => panic!("opened over a damaged redo log"),
        Err(other) => panic!("untyped: {other:?}"),
    }
    assert_eq!(
        std::fs::read(&log).expect("read log"),
        b"something else entirely"
    );
}

/// Twelve 10 MiB snapshots saved at once make more than the 64 MiB a batch's record takes
/// before it stops taking requests (random text: about 7.5 MiB each stored compressed): the
/// rest go in the next batch, and everything is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_past_the_record_size_cap_are_split_and_all_kept() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rng = fastrand::Rng::with_seed(7);
    let big: String = (0..10 << 20).map(|_| rng.alphanumeric()).collect();
    {
        let store = one(dir.path()).expect("open");
        for n in 0..12 {
            store
                .append(&id(n), 1, &[entry(n, 1)])
                .await
                .expect("append");
        }
        let before = store.writer_stats();
        let mut tasks = Vec::new();
        for n in 0..12 {
            let store = store.clone();
            let state = json!({ "n": n, "big": big });
            tasks.push(tokio::spawn(async move {
                store
                    .save_snapshot(&id(n), &loom_core::Snapshot::new(1, state), 2)
                    .await
            }));
        }
        for t in tasks {
            t.await.expect("task").expect("save snapshot");
        }
        let after = store.writer_stats();
        assert_eq!(after.requests - before.requests, 12);
        assert!(after.commits - before.commits >= 2, "{before:?} {after:?}");
    }
    let store = one(dir.path()).expect("reopen");
    for n in 0..12 {
        let s = store
            .load_snapshot(&id(n), u64::MAX)
            .await
            .expect("load")
            .expect("a snapshot");
        assert_eq!(s.state["n"], json!(n));
        assert_eq!(s.state["big"].as_str().map(str::len), Some(10 << 20));
    }
}

/// The directory as a crash would leave it right now: both files copied while the store is
/// open and idle (the page cache is what a SIGKILLed process leaves behind). Returns how many
/// redo records the copied log holds.
fn crash_image(from: &std::path::Path, to: &std::path::Path) -> usize {
    std::fs::create_dir_all(to).unwrap();
    for f in [DATA_FILE, REDO_FILE] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    let log = std::fs::read(to.join(REDO_FILE)).unwrap();
    log.windows(4).filter(|w| *w == b"LRec").count()
}

/// Makes a store in `dir` with three appends to actor 1 and `image`, a crash image of it whose
/// log holds all three (no checkpoint yet); returns the live store's directory.
async fn three_appends_caught_in_the_log(
    dir: &std::path::Path,
    image: &std::path::Path,
) -> std::path::PathBuf {
    // A checkpoint (after 250 ms of traffic, or 1 s idle) would empty the log first: try again.
    let mut tries = 0;
    loop {
        tries += 1;
        let live = dir.join(format!("live-{tries}"));
        let store = one(&live).expect("open");
        for seq in 1..=3 {
            store
                .append(&id(1), seq, &[entry(1, seq)])
                .await
                .expect("append");
        }
        // Absent on the first try; a leftover of the last one otherwise.
        let _ = std::fs::remove_dir_all(image);
        let records = crash_image(&live, image);
        drop(store);
        if records == 3 {
            return live;
        }
        assert!(tries < 5, "never caught the log before a checkpoint");
    }
}

/// A redo log gone from a store that was written through one (deleted by hand, or left out of
/// a copy) is refused, not created again empty: the three appends it held would be lost
/// (*before*: the store opened without them). `salvage_damaged_redo` (`loom redo salvage`)
/// opens it without them. In a store of several partitions, a partition file emptied or
/// replaced by an empty one is refused too (*before*: it opened as a new, empty partition, its
/// actors gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_redo_log_or_an_emptied_partition_file_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("image");
    three_appends_caught_in_the_log(dir.path(), &image).await;
    std::fs::remove_file(image.join(REDO_FILE)).unwrap();
    match one(&image) {
        Err(e @ StoreError::Corrupt { .. }) => {
            let said = e.to_string();
            assert!(
                said.contains("loom.redo")
                    && said.contains("missing")
                    && said.contains("loom redo salvage"),
                "{said}"
            );
        }
        Ok(_) => panic!("opened without its redo log"),
        Err(other) => panic!("untyped: {other:?}"),
    }
    assert!(
        !image.join(REDO_FILE).exists(),
        "the refusal created the log"
    );
    let salvage = EmbeddedOptions {
        salvage_damaged_redo: true,
        partitions: Some(1),
        ..EmbeddedOptions::default()
    };
    drop(EmbeddedStore::open_with(&image, salvage).expect("salvage"));
    let store = one(&image).expect("opens once salvaged");
    assert!(journal(&store, 1).await.is_empty());
    drop(store);

    // Two partitions, an actor in the second, its file emptied.
    let two = dir.path().join("two");
    let options = EmbeddedOptions {
        partitions: Some(2),
        ..EmbeddedOptions::default()
    };
    let second = (0..)
        .map(|i| loom_core::ActorId::new("acct", format!("a{i}")).unwrap())
        .find(|a| loom_core::partition::partition_of(a, 2) == 1)
        .unwrap();
    {
        let store = EmbeddedStore::open_with(&two, options).expect("open");
        store
            .append(&second, 1, &[entry(1, 1)])
            .await
            .expect("append");
    }
    std::fs::File::create(two.join("loom-p1.redb")).unwrap();
    match EmbeddedStore::open_with(&two, options) {
        Err(e @ StoreError::Corrupt { .. }) => {
            assert!(e.to_string().contains("loom-p1.redb"), "{e}");
        }
        Ok(s) => panic!(
            "opened over an emptied partition file: highest {}",
            s.highest_seq(&second).await.unwrap()
        ),
        Err(other) => panic!("untyped: {other:?}"),
    }

    // A store of one partition, closed, its data file emptied: its log's header shows the file
    // was written (*before*: it opened as a new store, its actors gone).
    let single = dir.path().join("single");
    {
        let store = one(&single).expect("open");
        store
            .append(&id(1), 1, &[entry(1, 1)])
            .await
            .expect("append");
    }
    std::fs::File::create(single.join(DATA_FILE)).unwrap();
    match one(&single) {
        Err(e @ StoreError::Corrupt { .. }) => {
            assert!(e.to_string().contains(DATA_FILE), "{e}");
        }
        Ok(s) => panic!(
            "opened over an emptied data file: {} entries",
            journal(&s, 1).await.len()
        ),
        Err(other) => panic!("untyped: {other:?}"),
    }

    // A damaged header of the second partition's log is named as that log (*before*: as
    // `loom.redo`, partition 0's).
    let three = dir.path().join("three");
    drop(EmbeddedStore::open_with(&three, options).expect("open"));
    std::fs::write(three.join("loom-p1.redo"), b"not a log").unwrap();
    match EmbeddedStore::open_with(&three, options) {
        Err(StoreError::Corrupt { what, .. }) => assert!(what.ends_with("loom-p1.redo"), "{what}"),
        Ok(_) => panic!("opened over a log without its header"),
        Err(other) => panic!("untyped: {other:?}"),
    }
}

/// Three acknowledged appends, a crash before any checkpoint, and rot in the first record's
/// body: the records after it prove it was acknowledged, so the store refuses to open, naming
/// the file and the offset, and drops nothing. `salvage_damaged_redo` (what `loom redo salvage`
/// sets) then opens it without them, keeping the bytes aside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_in_the_middle_of_the_log_is_refused_not_dropped() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("image");
    let live = three_appends_caught_in_the_log(dir.path(), &image).await;
    let log = image.join(REDO_FILE);
    let mut bytes = std::fs::read(&log).unwrap();
    // The header (8), the first record's mark, length, checksum (12), lsn and stamp (16), then
    // its writes: rot in them.
    bytes[8 + 12 + 16 + 10] ^= 0x04;
    std::fs::write(&log, &bytes).unwrap();
    match one(&image) {
        Err(StoreError::Corrupt { what, source }) => {
            assert!(
                what.contains("loom.redo") && what.contains("at byte 8"),
                "{what}"
            );
            let why = source.to_string();
            assert!(
                why.contains("batches through 2 were acknowledged")
                    && why.contains("loom redo salvage"),
                "{why}"
            );
        }
        Ok(_) => panic!("opened over a damaged redo log"),
        Err(other) => panic!("untyped: {other:?}"),
    }
    assert_eq!(std::fs::read(&log).unwrap(), bytes, "the log was changed");
    // The operator's choice: open without the damaged batches.
    let salvage = EmbeddedOptions {
        salvage_damaged_redo: true,
        ..EmbeddedOptions {
            partitions: Some(1),
            ..EmbeddedOptions::default()
        }
    };
    {
        let store = EmbeddedStore::open_with(&image, salvage).expect("salvage");
        assert!(journal(&store, 1).await.is_empty());
        store
            .append(&id(1), 1, &[entry(1, 1)])
            .await
            .expect("the salvaged store takes writes");
    }
    let kept = std::fs::read_dir(&image)
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("loom.redo.damaged-")
        })
        .expect("the dropped bytes are kept");
    assert_eq!(std::fs::read(kept.path()).unwrap(), bytes[8..]);
    // The live store, untouched, has all three.
    let store = one(&live).expect("reopen live");
    assert_eq!(journal(&store, 1).await.len(), 3);
}

/// A panic on the thread that writes the log (here inside the log write, on the writer thread
/// or the log thread, whichever writes): the batch it was making durable is visible to reads
/// but never will be durable. The store must latch failed: the read that sees the batch fails
/// instead of waiting forever, and so does every later write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_writing_the_log_latches_the_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, h) = open_faulty(dir.path());
    store
        .append(&id(1), 1, &[entry(1, 1)])
        .await
        .expect("append");
    h.faults.panic_writes.store(1, Ordering::SeqCst);
    let failed = store.append(&id(1), 2, &[entry(1, 2)]).await;
    assert!(failed.is_err(), "{failed:?}");
    let read = tokio::time::timeout(Duration::from_secs(10), store.highest_seq(&id(1)))
        .await
        .expect("a read hangs after the thread writing the log died");
    assert!(read.is_err(), "{read:?}");
    assert!(
        store.append(&id(1), 2, &[entry(1, 2)]).await.is_err(),
        "a write after the panic was taken"
    );
    drop(store);
    // Reopened: the acknowledged append is there and the journal gapless (the failed one's
    // outcome is unknown, as for any request that failed with the store).
    check(dir.path(), &HashMap::from([(1, 1)])).await;
}

/// The store reopens itself after a failed log sync while this process goes on: the leases it
/// holds and the message it leased are still its own after the reopen (renewed, acked), not
/// released as a dead process's would be at a first opening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopen_after_a_failure_keeps_this_processs_leases_and_leased_messages() {
    use loom_core::{ActorId, Envelope, LeaseManager, LeaseOptions, Mailbox};
    let dir = tempfile::tempdir().expect("temp dir");
    let (tx, rx) = std::sync::mpsc::channel();
    let store = EmbeddedStore::open_with_redo(
        dir.path(),
        EmbeddedOptions {
            partitions: Some(1),
            ..EmbeddedOptions::default()
        },
        move |f| {
            let redo = FaultyRedo::new(f);
            // Only the first opening's faults are armed; a closed channel later is fine.
            let _ = tx.send(redo.faults.clone());
            Box::new(redo)
        },
    )
    .expect("open");
    let faults = rx.recv().expect("faults");
    let a = ActorId::new("counter", "a").expect("id");
    let ttl = Duration::from_secs(60);
    let lease = store.acquire(&a, "node-1", ttl).await.expect("acquire");
    store
        .enqueue(&Envelope::new(a.clone(), json!(1)), None)
        .await
        .expect("enqueue");
    let opts = LeaseOptions {
        visibility: ttl,
        max_deliveries: 10,
        ..LeaseOptions::default()
    };
    let d = store
        .lease(&a, opts)
        .await
        .expect("lease")
        .expect("a message");
    faults.fail_syncs.store(1, Ordering::SeqCst);
    let failed = store.append(&id(0), 1, &[entry(0, 1)]).await;
    assert!(
        matches!(failed, Err(StoreError::Storage { .. })),
        "{failed:?}"
    );
    // It reopens by itself (first attempt after 0.5 s).
    let start = Instant::now();
    while store.highest_seq(&id(0)).await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "never reopened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let renewed = store
        .renew(&lease, ttl)
        .await
        .expect("the lease is still ours");
    assert_eq!(renewed.token, lease.token);
    store
        .ack(&d.receipt)
        .await
        .expect("the leased message is still ours");
    assert_eq!(store.pending(&a).await.expect("pending"), 0);
}
