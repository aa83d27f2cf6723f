//! Rot in the embedded data file: bytes flipped at random, tails cut off, a snapshot record
//! damaged. Each is detected with a clear error, or recovered from an older snapshot and
//! reported; wrong data is never served silently.

use std::path::Path;
use std::time::Duration;

use futures::TryStreamExt;
use loom_core::embedded::{DATA_FILE, REDO_FILE, tables};
use loom_core::partition::partition_of;
use loom_core::runtime::{Compaction, Runtime};
use loom_core::{ActorId, EmbeddedStore, Entry, EntryKind, JournalStore, SeqRange, StoreError};
use loom_testkit::runtime::Counter;
use redb::ReadableTable;
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

const ACTORS: u32 = 12;
const ENTRIES: u64 = 300;

fn id(n: u32) -> ActorId {
    ActorId::new("rot", format!("a{n}")).expect("id")
}

fn entry(n: u32, seq: u64) -> Entry {
    let mut e = Entry::new(
        seq,
        EntryKind::Completed {
            reply: json!({ "actor": n, "seq": seq, "pad": "p".repeat(40) }),
        },
    );
    e.at = loom_core::Timestamp::from_millis(1_700_000_000_000 + seq);
    e
}

/// A data file with known journals.
async fn template(dir: &Path) {
    let store = one(dir).expect("open");
    for n in 0..ACTORS {
        let entries: Vec<Entry> = (1..=ENTRIES).map(|s| entry(n, s)).collect();
        store.append(&id(n), 1, &entries).await.expect("append");
    }
}

/// Reads everything; every entry served must be the one written. Returns (entries served,
/// errors reported).
async fn read_all(dir: &Path) -> (u64, u64) {
    let store = match one(dir) {
        Ok(s) => s,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return (0, 1);
        }
    };
    let (mut served, mut errors) = (0, 0);
    for n in 0..ACTORS {
        let mut s = store.read(&id(n), SeqRange::all());
        loop {
            match s.try_next().await {
                Ok(Some(e)) => {
                    assert_eq!(
                        e,
                        entry(n, e.seq),
                        "actor {n}: wrong data served at seq {}",
                        e.seq
                    );
                    served += 1;
                }
                Ok(None) => break,
                Err(e) => {
                    assert!(
                        matches!(
                            e,
                            StoreError::Corrupt { .. }
                                | StoreError::Storage { .. }
                                | StoreError::Gap { .. }
                        ),
                        "unexpected error kind: {e:?}"
                    );
                    errors += 1;
                    break;
                }
            }
        }
    }
    (served, errors)
}

/// Copies the template's redo log (empty but for its header: the template was closed) beside
/// a damaged copy of its data file, as the store's directory holds it: a data file without the
/// log it was written with is refused before anything is read.
fn with_its_log(tpl: &std::path::Path, dir: &std::path::Path) {
    std::fs::copy(tpl.join(REDO_FILE), dir.join(REDO_FILE)).expect("copy the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_are_detected_or_harmless_never_served() {
    let tpl = tempfile::tempdir().expect("temp dir");
    template(tpl.path()).await;
    let original = std::fs::read(tpl.path().join(DATA_FILE)).expect("read data file");
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let (mut detected, mut served) = (0, 0);
    for round in 0..40 {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut bytes = original.clone();
        for _ in 0..1 + round % 8 {
            let at = rng.usize(..bytes.len());
            bytes[at] ^= 1 << rng.u32(0..8);
        }
        std::fs::write(dir.path().join(DATA_FILE), &bytes).expect("write damaged copy");
        with_its_log(tpl.path(), dir.path());
        let (s, errors) = read_all(dir.path()).await;
        detected += errors;
        served += s;
    }
    assert!(
        detected > 0,
        "40 damaged files and not one error: the checks do not run"
    );
    // Flips in pages no read touches leave entries to serve: none at all would mean every
    // copy was refused before its entries were read, and the check above proved nothing.
    assert!(served > 0, "no damaged copy served an entry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_tails_are_detected_or_harmless_never_served() {
    let tpl = tempfile::tempdir().expect("temp dir");
    template(tpl.path()).await;
    let original = std::fs::read(tpl.path().join(DATA_FILE)).expect("read data file");
    let mut rng = fastrand::Rng::with_seed(0x7a11);
    for _ in 0..20 {
        let dir = tempfile::tempdir().expect("temp dir");
        let cut = rng.usize(1..original.len());
        std::fs::write(dir.path().join(DATA_FILE), &original[..cut]).expect("write cut copy");
        with_its_log(tpl.path(), dir.path());
        read_all(dir.path()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_record_falls_back_to_the_older_one_and_says_so() {
    let dir = tempfile::tempdir().expect("temp dir");
    let compaction = Compaction {
        every_entries: Some(10),
        every_bytes: None,
        keep: 2,
    };
    let partitions;
    {
        let rt = Runtime::builder()
            .embedded(dir.path())
            .register::<Counter>()
            .configure(|c| c.compaction = compaction)
            .start()
            .await
            .expect("runtime");
        let c = rt.actor::<Counter>("c").unwrap();
        for _ in 0..40 {
            c.send(1).await.expect("send");
        }
        assert_eq!(c.ask(0).await.expect("ask"), 40);
        let store = rt.store().clone();
        let a = ActorId::new("counter", "c").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while store.info(&a).await.expect("info").snapshots.len() < 2 {
            assert!(std::time::Instant::now() < deadline, "no two snapshots");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        partitions = store.partitions();
        rt.shutdown().await;
    }
    // Damage the newest snapshot's record in the file, byte by byte, as rot would.
    let newest;
    {
        // In the file of the actor's partition.
        let a = ActorId::new("counter", "c").unwrap();
        let file = loom_core::embedded::data_file(partition_of(&a, partitions));
        let db = redb::Database::open(dir.path().join(file)).expect("open the data file");
        let txn = db.begin_write().expect("write txn");
        {
            let mut snaps = txn.open_table(tables::SNAPSHOTS).expect("snapshots table");
            let (key, mut value) = {
                let last = snaps.last().expect("read").expect("a snapshot");
                (last.0.value().1, last.1.value().to_vec())
            };
            newest = key;
            let mid = value.len() / 2;
            value[mid] ^= 0x20;
            snaps
                .insert(("counter/c", key), value.as_slice())
                .expect("write the damage");
        }
        txn.commit().expect("commit");
    }
    let store = EmbeddedStore::open(dir.path()).expect("reopen");
    let a = ActorId::new("counter", "c").unwrap();
    match store.load_snapshot(&a, newest).await {
        Err(StoreError::Corrupt { what, .. }) => {
            assert!(what.contains(&format!("snapshot {newest}")), "{what}")
        }
        other => panic!("a damaged snapshot was served: {other:?}"),
    }
    let rt = Runtime::builder()
        .store(std::sync::Arc::new(store))
        .register::<Counter>()
        .configure(|c| c.compaction = Compaction::DISABLED)
        .start()
        .await
        .expect("runtime");
    assert_eq!(
        rt.actor::<Counter>("c").unwrap().ask(0).await.expect("ask"),
        40,
        "the fallback lost state"
    );
    assert_eq!(
        rt.metrics().corrupt_snapshots,
        1,
        "the fallback was not reported"
    );
    rt.shutdown().await;
}

/// Flips a byte near the end of the stored frame of `actor`'s message at `position` (the store
/// closed).
fn rot_message(dir: &Path, actor: &str, position: u64) {
    let db = redb::Database::open(dir.join(DATA_FILE)).expect("open the data file");
    let txn = db.begin_write().expect("write txn");
    {
        let mut messages = txn.open_table(tables::MESSAGES).expect("messages table");
        let mut value = messages
            .get((actor, position))
            .expect("read")
            .expect("the message")
            .value()
            .to_vec();
        let n = value.len();
        value[n - 2] ^= 0x11;
        messages
            .insert((actor, position), value.as_slice())
            .expect("write the damage");
    }
    txn.commit().expect("commit");
}

/// A turn that leases its actor's next message in its write (`Turn::next`) and meets a
/// message whose frame rotted buries it and leases the one behind it, as a lease does: a turn
/// that asked and got nothing leaves the runtime's actor waiting for a wake-up, which the
/// messages already waiting would never send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_leasing_past_a_corrupt_message_buries_it_and_leases_the_next() {
    use loom_core::store::LeaseOptions;
    use loom_core::store::backend::{Settle, Turn};
    use loom_core::{Envelope, Mailbox, Store};
    let dir = tempfile::tempdir().expect("temp dir");
    let c = ActorId::new("counter", "c").unwrap();
    let messages: Vec<Envelope> = (1..=3)
        .map(|n| Envelope::new(c.clone(), json!(n)))
        .collect();
    {
        let store = one(dir.path()).expect("open");
        for m in &messages {
            store.enqueue(m, None).await.expect("enqueue");
        }
    }
    rot_message(dir.path(), "counter/c", 2);
    let store = one(dir.path()).expect("open");
    let first = store
        .lease(&c, LeaseOptions::default())
        .await
        .expect("lease")
        .expect("the first message");
    assert_eq!(first.envelope.id, messages[0].id);
    let committed = store
        .commit_turn(Turn {
            settle: Some(Settle::Ack(&first.receipt)),
            next: Some(LeaseOptions::default()),
            ..Turn::append(&c, 1, &[])
        })
        .await
        .expect("turn");
    let next = committed.next.expect("the message behind the rotten one");
    assert_eq!(next.envelope.id, messages[2].id);
    let dead = store.dead_letters(None, 10).await.expect("dead letters");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].envelope.id, messages[1].id);
}

/// One message whose stored frame rotted: it goes to the dead letters with reason "corrupt
/// frame" (its raw bytes kept), and the message behind it is processed. Before, every lease
/// counted a delivery and failed to decode it, and burying it decoded it again and failed: the
/// mailbox was blocked for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_message_frame_is_dead_lettered_and_the_next_message_runs() {
    use loom_core::{Envelope, Mailbox};
    let dir = tempfile::tempdir().expect("temp dir");
    let c = ActorId::new("counter", "c").unwrap();
    let damaged = Envelope::new(c.clone(), json!(5));
    {
        let store = one(dir.path()).expect("open");
        store.enqueue(&damaged, None).await.expect("enqueue");
        store
            .enqueue(&Envelope::new(c.clone(), json!(7)), None)
            .await
            .expect("enqueue");
    }
    rot_message(dir.path(), "counter/c", 1);
    let rt = Runtime::builder()
        .embedded(dir.path())
        .register::<Counter>()
        .start()
        .await
        .expect("runtime");
    let store = rt.store().clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while store.pending(&c).await.expect("pending") > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the damaged message blocks the mailbox"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        rt.actor::<Counter>("c").unwrap().ask(0).await.expect("ask"),
        7
    );
    let dead = store.dead_letters(None, 10).await.expect("dead letters");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0].reason.starts_with("corrupt frame"),
        "{}",
        dead[0].reason
    );
    assert_eq!(dead[0].envelope.id, damaged.id);
    assert!(
        dead[0].envelope.payload["corrupt_frame"]
            .as_str()
            .is_some_and(|hex| !hex.is_empty()),
        "{:?}",
        dead[0].envelope.payload
    );
    rt.shutdown().await;
}
