//! The embedded store: the default backend, crash-safe in one data directory, no server.
//!
//! Built on [redb](https://docs.rs/redb) (copy-on-write B-trees, checksummed commits, ACID), with
//! **group commit** (see `writer.rs`): concurrent requests from any number of actors share one
//! write transaction and one fsync, and each caller's future completes only after that commit is
//! durable. On disk the fsync is of a **redo log** (`redo.rs`) holding each batch's writes;
//! redb's own file is made durable by periodic checkpoints, and the log replayed after a crash.
//!
//! The store is cut into **partitions** (see [`crate::partition`]): each is its own redb file,
//! redo log and writer thread, so that turns of different partitions commit in parallel, and a
//! turn writes only its own partition; a message to another partition leaves through the
//! outbox and is moved by the relay (`relay.rs`). The count is fixed when the store is created
//! (default: the machine's cores) and recorded in every file.
//!
//! The directory holds `loom.redb` and `loom.redo` (partition 0's data and redo log, the redo
//! log empty after a clean close), `loom-pN.redb` and `loom-pN.redo` for each further partition
//! N, and `LOCK`, whose `flock` keeps a second process out; the refused process gets
//! [`StoreError::Locked`] naming the directory and the holder.
//!
//! [`EmbeddedStore::in_memory`] runs the same engine and the same code on memory instead of a file:
//! that is the in-memory backend, for tests and examples that need no durability.

mod idempotency;
mod journal;
mod lease;
mod lock;
mod mailbox;
mod membership;
mod park;
mod redo;
mod relay;
mod reopen;
mod repartition;
#[cfg(feature = "testing")]
pub mod tables;
#[cfg(not(feature = "testing"))]
mod tables;
mod turn;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable};

use crate::codec::CodecError;
use crate::error::{StoreError, StoreResult};
use crate::id::ActorId;
use crate::partition::{check_partitions, partition_of};

pub use crate::store::backend::{OutboxState, check_outboxes};
pub use lock::LOCK_FILE;
use lock::{DirLock, with_path};
/// redb's file backend and backend trait, for [`EmbeddedStore::on_backend`].
#[cfg(feature = "testing")]
pub use redb::StorageBackend;
#[cfg(feature = "testing")]
pub use redb::backends::FileBackend;
use redo::Durability;
pub use redo::REDO_FILE;
#[cfg(feature = "testing")]
pub use redo::RedoFile;
pub use repartition::Repartitioned;
use tables::{LAYOUT_VERSION, se};
use writer::{LogSetup, Writer};

/// Name of the data file inside the data directory (partition 0's).
pub const DATA_FILE: &str = "loom.redb";

/// Name of partition `p`'s data file: [`DATA_FILE`] for partition 0, `loom-p<p>.redb` after.
pub fn data_file(p: u32) -> String {
    if p == 0 {
        DATA_FILE.to_owned()
    } else {
        format!("loom-p{p}.redb")
    }
}

/// Name of partition `p`'s redo log: [`REDO_FILE`] for partition 0, `loom-p<p>.redo` after.
pub fn redo_file(p: u32) -> String {
    if p == 0 {
        REDO_FILE.to_owned()
    } else {
        format!("loom-p{p}.redo")
    }
}

/// `META` keys of the partition count and of the file's own partition.
const PARTITIONS: &str = "partitions";
const PARTITION: &str = "partition";

/// Settings of the embedded store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddedOptions {
    /// Bytes of redb page cache (default 32 MiB). Reads beyond it go to the OS page cache; it
    /// bounds the store's share of the process's memory however long the journals read are.
    pub cache_bytes: usize,
    /// Open even though the redo log is damaged in the middle (default false: such a store is
    /// refused with [`StoreError::Corrupt`] naming the file and offset). The batches before the
    /// damage are kept; the damaged bytes and everything after them, acknowledged batches
    /// included, are moved to `loom.redo.damaged-<ms>` and lost to the store. The same for a
    /// redo log gone from a data file written with one: the store opens without what it held.
    /// An operator's decision (`loom redo salvage`), after any copy of the directory
    /// worth saving was made.
    pub salvage_damaged_redo: bool,
    /// After a storage failure (a full disk, an I/O error: the store then refuses every request,
    /// see `writer.rs`), reopen the store in the background, with backoff (0.5 s doubling to
    /// 30 s), until it opens again: writes then go on by themselves once the cause is gone
    /// (default true). Off, the store stays failed until the process opens it again.
    pub reopen_after_failure: bool,
    /// How many partitions a store created by this opening gets (`None`: the machine's cores,
    /// [`default_partitions`](crate::partition::default_partitions)). An existing store keeps
    /// the count it was created with; asking for another is refused with
    /// [`StoreError::InvalidRequest`] (`loom store repartition` changes it, offline).
    pub partitions: Option<u32>,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            cache_bytes: 32 * 1024 * 1024,
            salvage_damaged_redo: false,
            reopen_after_failure: true,
            partitions: None,
        }
    }
}

/// The embedded store; cheap to clone (clones share one database).
///
/// ```
/// use loom_core::{ActorId, EmbeddedStore, Entry, EntryKind, JournalStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let id = ActorId::new("account", "alice")?;
/// {
///     let store = EmbeddedStore::open(dir.path())?;
///     store.append(&id, 1, &[Entry::new(1, EntryKind::Failed { error: "x".into(), dead_lettered: false })]).await?;
/// }
/// // Reopened, the append is there.
/// let store = EmbeddedStore::open(dir.path())?;
/// assert_eq!(store.highest_seq(&id).await?, 1);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EmbeddedStore {
    parts: Arc<Parts>,
}

/// The partitions of one store, and their relays.
struct Parts {
    /// Partition `p` is `list[p]`.
    list: Arc<[Arc<reopen::Shared>]>,
    /// Dropped (stopped and joined) before the partitions close: a relay holds them.
    relays: relay::Relays,
    /// Recorded results, signalled after their commit (`IdempotencyStore::completions`): two
    /// runtimes of one process on one store (a client and a host) hand each other replies.
    done: tokio::sync::broadcast::Sender<crate::store::Completion>,
}

/// How many reply signals a slow receiver may fall behind by before it misses some (and its
/// waiters fall back to their poll).
const SIGNALS_BUFFERED: usize = 4096;

/// One opening of the database: what a reopen after a failure replaces whole.
struct Inner {
    db: Arc<Database>,
    writer: Writer,
    durability: Arc<Durability>,
    reads: Arc<Reads>,
    /// On disk (with a redo log), not in memory or on a caller's backend.
    on_disk: bool,
    /// The store's partition count, as recorded in this file.
    partitions: u32,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.writer.shutdown();
        // A read whose caller went away (its task was aborted, say) still runs to the end on
        // a blocking thread, holding the database: wait for it, so that once the last handle
        // is dropped the directory can be opened again at once.
        self.reads.wait_idle();
        if self.on_disk {
            self.stamp_on_close();
        }
    }
}

impl Inner {
    /// When the database closes, redb makes every batch committed so far durable, checkpoint or
    /// not. The writer checkpoints on its way out, but not after a failure (or if it died):
    /// so, with the writer gone, store the number of the last batch committed, durably, so
    /// that replay skips exactly the records whose writes redb now holds. (Stamping every
    /// batch instead cost ~10 µs per append, a tenth of `append-seq`.)
    fn stamp_on_close(&self) {
        let lsn = self.durability.visible();
        let stamped = (|| -> Result<(), redb::Error> {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(redb::Durability::Immediate)?;
            let mut meta = txn.open_table(tables::META)?;
            if meta.get(writer::REDO_LSN)?.map(|v| v.value()) != Some(lsn) {
                meta.insert(writer::REDO_LSN, lsn)?;
            }
            drop(meta);
            txn.commit()?;
            Ok(())
        })();
        if let Err(e) = stamped {
            // redb refuses writes after an I/O error, and then does not persist anything on
            // close either; the log still holds every acknowledged batch.
            tracing::error!(error = %e, "embedded store could not record the last batch on close");
        }
    }
}

/// Reads running on blocking threads. Invariant: `running` counts the [`ReadGuard`]s alive,
/// and each guard lets go of its database handle before it leaves the count.
#[derive(Default)]
struct Reads {
    running: std::sync::Mutex<usize>,
    idle: std::sync::Condvar,
}

impl Reads {
    fn enter(self: &Arc<Self>, db: Arc<Database>) -> ReadGuard {
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        ReadGuard {
            db: Some(db),
            reads: self.clone(),
        }
    }

    fn wait_idle(&self) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        while *running > 0 {
            running = self.idle.wait(running).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// One read in flight: holds the database until the read is over, panicking or not.
struct ReadGuard {
    db: Option<Arc<Database>>,
    reads: Arc<Reads>,
}

impl ReadGuard {
    /// The database; `None` only while the guard drops, so never seen by a read.
    fn db(&self) -> StoreResult<&Database> {
        self.db.as_deref().ok_or(StoreError::Closed)
    }
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        self.db.take();
        let mut running = self.reads.running.lock().unwrap_or_else(|p| p.into_inner());
        *running -= 1;
        if *running == 0 {
            self.reads.idle.notify_all();
        }
    }
}

/// What the writer has done since the store was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterStats {
    /// Batches committed (on disk, each one record of the redo log; otherwise one fsync).
    pub commits: u64,
    /// Write requests acknowledged by those commits.
    pub requests: u64,
    /// Checkpoints: redb made durable through the latest batch and the redo log emptied.
    pub checkpoints: u64,
}

/// Wraps the redo log file (tests wrap it through `EmbeddedStore::open_with_redo`, behind the
/// `testing` feature); called at every opening.
type Wrap = Arc<dyn Fn(std::fs::File) -> Box<dyn redo::RedoFile> + Send + Sync>;

/// What a store on disk opens with.
struct Disk<'a> {
    dir: &'a Path,
    wrap: &'a Wrap,
    part: u32,
}

/// Which partition a file is, and what the opening expects of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ident {
    /// The partition.
    pub(super) index: u32,
    /// The store's partition count; `None` to take what the file records (partition 0 of a
    /// store being opened).
    pub(super) count: Option<u32>,
    /// The store is being created: a file without a recorded count gets `count`.
    pub(super) new: bool,
}

/// Opens (creating) the redo log; returns it, its bytes, and whether it was just created.
fn open_log(dir: &Path, part: u32) -> StoreResult<(std::fs::File, Vec<u8>, bool)> {
    use std::io::Read;
    let path = dir.join(redo_file(part));
    let err = |e: std::io::Error| StoreError::storage(tables::BACKEND, with_path(e, &path));
    let created = !path.exists();
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(err)?;
    if created {
        // Durable before the data file's first commit says it has a log (`check_log_there`).
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::storage(tables::BACKEND, with_path(e, dir)))?;
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(err)?;
    Ok((file, bytes, created))
}

/// Refuses to open a partition whose redo log is missing though its data file was written
/// with one (`had_log`: the file records `"redo_lsn"`, which every opening with a log commits):
/// the batches acknowledged since its last checkpoint would be silently lost (rule D4). A log
/// is created, and its directory entry synced, before the first commit of its data file
/// (`open_log`), so a data file that says it had one did. (An older build synced that entry
/// only after the first commit: a crash between the two may have lost an empty log, and its
/// store is then refused with nothing lost.) With `salvage` the store opens without the
/// missing log, saying so.
fn check_log_there(dir: &Path, part: u32, had_log: bool, salvage: bool) -> StoreResult<()> {
    let path = dir.join(redo_file(part));
    let missing = match std::fs::metadata(&path) {
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            return Err(StoreError::storage(tables::BACKEND, with_path(e, &path)));
        }
    };
    if !missing || !had_log {
        return Ok(());
    }
    if salvage {
        tracing::error!(log = %path.display(), "opened without its redo log, which is missing: batches acknowledged after its last checkpoint are lost");
        return Ok(());
    }
    Err(StoreError::corrupt(
        path.display().to_string(),
        CodecError::Body(format!(
            "the redo log is missing, though {} was written with one: batches acknowledged \
             since its last checkpoint would be lost. Restore the directory from a backup (its \
             redo logs with it), or open it without them with `loom redo salvage --store {} --yes`",
            data_file(part),
            dir.display()
        )),
    ))
}

/// Keeps a copy of dropped redo log bytes next to the log (`loom.redo.<what>-<ms>`), for
/// whoever investigates; says where, or why it could not.
fn keep_dropped(dir: &Path, part: u32, what: &str, tail: &[u8]) -> Result<PathBuf, String> {
    let at = crate::time::Timestamp::now().as_millis();
    let path = dir.join(format!("{}.{what}-{at}", redo_file(part)));
    // Synced, so that the copy outlives the log's truncation that follows.
    let written = std::fs::File::create(&path).and_then(|mut f| {
        std::io::Write::write_all(&mut f, tail)?;
        f.sync_all()
    });
    written
        .map(|()| path.clone())
        .map_err(|e| format!("could not keep the dropped tail in {}: {e}", path.display()))
}

/// Empties the redo log down to its header, durably (and its directory entry, if new).
fn reset_log(file: &std::fs::File, dir: &Path, part: u32, created: bool) -> StoreResult<()> {
    use std::os::unix::fs::FileExt;
    let path = dir.join(redo_file(part));
    let err = |e: std::io::Error| StoreError::storage(tables::BACKEND, with_path(e, &path));
    file.set_len(0).map_err(err)?;
    file.write_all_at(redo::MAGIC, 0).map_err(err)?;
    file.sync_all().map_err(err)?;
    if created {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::storage(tables::BACKEND, with_path(e, dir)))?;
    }
    Ok(())
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in directory `dir`.
    ///
    /// Fails with [`StoreError::Locked`] if another process (or another store in this process)
    /// has the directory open.
    pub fn open(dir: impl AsRef<Path>) -> StoreResult<Self> {
        Self::open_with(dir, EmbeddedOptions::default())
    }

    /// Opens (creating if needed) the store in directory `dir` with `options`.
    pub fn open_with(dir: impl AsRef<Path>, options: EmbeddedOptions) -> StoreResult<Self> {
        Self::open_wrapped(dir, options, |f| Box::new(f))
    }

    /// [`EmbeddedStore::open_with`], with the redo log file wrapped by `wrap`: for tests that
    /// make the log's writes or syncs fail, or hold them up.
    ///
    /// ```
    /// use loom_core::{EmbeddedOptions, EmbeddedStore};
    ///
    /// let dir = tempfile::tempdir()?;
    /// // The plain file, unwrapped: the same as `open_with`.
    /// let store = EmbeddedStore::open_with_redo(dir.path(), EmbeddedOptions::default(), |f| {
    ///     Box::new(f)
    /// })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[cfg(feature = "testing")]
    pub fn open_with_redo(
        dir: impl AsRef<Path>,
        options: EmbeddedOptions,
        wrap: impl Fn(std::fs::File) -> Box<dyn RedoFile> + Send + Sync + 'static,
    ) -> StoreResult<Self> {
        Self::open_wrapped(dir, options, wrap)
    }

    fn open_wrapped(
        dir: impl AsRef<Path>,
        options: EmbeddedOptions,
        wrap: impl Fn(std::fs::File) -> Box<dyn redo::RedoFile> + Send + Sync + 'static,
    ) -> StoreResult<Self> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::storage(tables::BACKEND, with_path(e, dir)))?;
        let lock = Arc::new(DirLock::acquire(dir)?);
        let wrap: Wrap = Arc::new(wrap);
        let asked = options.partitions.map(check_partitions).transpose()?;
        let disk = |index: u32, count: u32| reopen::Disk {
            dir: dir.to_path_buf(),
            options,
            wrap: wrap.clone(),
            ident: Ident {
                index,
                count: Some(count),
                new: false,
            },
            _lock: lock.clone(),
        };
        let mut list: Vec<(u32, Inner)> = Vec::new();
        if dir.join(DATA_FILE).exists() {
            // An existing store: partition 0 says how many there are.
            let ident = Ident {
                index: 0,
                count: asked,
                new: false,
            };
            let first = open_dir(dir, ident, options, &wrap, Opening::First)?;
            let count = first.partitions;
            list.push((0, first));
            for p in 1..count {
                if !dir.join(data_file(p)).exists() {
                    return Err(StoreError::corrupt(
                        format!("{}", dir.join(data_file(p)).display()),
                        CodecError::Body(format!(
                            "the store has {count} partitions and partition {p}'s file is missing; restore the directory from a backup"
                        )),
                    ));
                }
                let ident = Ident {
                    index: p,
                    count: Some(count),
                    new: false,
                };
                list.push((p, open_dir(dir, ident, options, &wrap, Opening::First)?));
            }
        } else {
            // A new store: partition 0 is created last, so that a store whose creation was
            // cut short is created again, not opened with partitions missing.
            let count = asked.unwrap_or_else(crate::partition::default_partitions);
            for p in (0..count).rev() {
                let ident = Ident {
                    index: p,
                    count: Some(count),
                    new: true,
                };
                let inner = open_dir(dir, ident, options, &wrap, Opening::First)?;
                // A partition file holding actors where no store exists: `loom.redb` was lost,
                // not a creation cut short. Refused, never adopted into an empty store.
                if p > 0 && holds_actors(&inner)? {
                    return Err(StoreError::corrupt(
                        format!("{}", dir.join(DATA_FILE).display()),
                        CodecError::Body(format!(
                            "partition 0's file is missing while {} holds actors; restore the directory from a backup",
                            data_file(p)
                        )),
                    ));
                }
                list.push((p, inner));
            }
            list.reverse();
        }
        let count = list.len() as u32;
        relay::reconcile(&list.iter().map(|(_, i)| i).collect::<Vec<_>>())?;
        let shared = list
            .into_iter()
            .map(|(p, inner)| reopen::Shared::new(inner, Some(disk(p, count))))
            .collect();
        EmbeddedStore::from_parts(shared)
    }

    /// The store of these partitions, with its relays started.
    fn from_parts(list: Vec<Arc<reopen::Shared>>) -> StoreResult<Self> {
        let list: Arc<[Arc<reopen::Shared>]> = list.into();
        let relays = relay::Relays::start(&list)?;
        Ok(EmbeddedStore {
            parts: Arc::new(Parts {
                list,
                relays,
                done: tokio::sync::broadcast::channel(SIGNALS_BUFFERED).0,
            }),
        })
    }

    /// Opens the store in `dir`, which must already hold one: for tools that inspect a store and
    /// must not create an empty one by mistake.
    pub fn open_existing(dir: impl AsRef<Path>) -> StoreResult<Self> {
        let dir = dir.as_ref();
        let data = dir.join(DATA_FILE);
        if !data.is_file() {
            return Err(StoreError::InvalidRequest(format!(
                "{} holds no Loom store (no {DATA_FILE})",
                dir.display()
            )));
        }
        Self::open(dir)
    }

    /// A store on any redb storage backend (a fault-injecting one in tests, say). No directory
    /// and no lock file: the caller keeps other processes out of the storage.
    #[cfg(feature = "testing")]
    pub fn on_backend(
        backend: impl redb::StorageBackend,
        options: EmbeddedOptions,
    ) -> StoreResult<Self> {
        let db = Database::builder()
            .set_cache_size(options.cache_bytes)
            .create_with_backend(backend)
            .map_err(se)?;
        let inner = start(db, None, false, Opening::First, Ident::single())?;
        EmbeddedStore::from_parts(vec![reopen::Shared::new(inner, None)])
    }

    /// A store in memory: the same engine and rules, nothing on disk, gone when dropped. One
    /// partition.
    pub fn in_memory() -> StoreResult<Self> {
        Self::in_memory_partitioned(1)
    }

    /// A store in memory of `partitions` partitions (each its own engine, writer and relay, as
    /// on disk).
    ///
    /// ```
    /// use loom_core::{EmbeddedStore, Store};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = EmbeddedStore::in_memory_partitioned(4)?;
    /// assert_eq!(store.partitions(), 4);
    /// # Ok(()) }
    /// ```
    pub fn in_memory_partitioned(partitions: u32) -> StoreResult<Self> {
        let count = check_partitions(partitions)?;
        let mut list = Vec::new();
        for index in 0..count {
            let db = Database::builder()
                .create_with_backend(redb::backends::InMemoryBackend::new())
                .map_err(se)?;
            let ident = Ident {
                index,
                count: Some(count),
                new: true,
            };
            list.push(start(db, None, false, Opening::First, ident)?);
        }
        relay::reconcile(&list.iter().collect::<Vec<_>>())?;
        let list = list
            .into_iter()
            .map(|inner| reopen::Shared::new(inner, None))
            .collect();
        EmbeddedStore::from_parts(list)
    }
}

/// Which opening of a directory by this process this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opening {
    /// The first: what the file holds of leases and leased messages belonged to a process that
    /// is gone.
    First,
    /// After a failure (`reopen.rs`): this process still runs, and its leases and leased
    /// messages are still its own.
    Again,
}

#[cfg(feature = "testing")]
impl Ident {
    /// The one partition of a store that has one.
    fn single() -> Self {
        Ident {
            index: 0,
            count: Some(1),
            new: true,
        }
    }
}

/// Opens partition `ident.index`'s database in `dir` (whose lock the caller holds): at open,
/// and at every reopen after a failure.
fn open_dir(
    dir: &Path,
    ident: Ident,
    options: EmbeddedOptions,
    wrap: &Wrap,
    opening: Opening,
) -> StoreResult<Inner> {
    let db = Database::builder()
        .set_cache_size(options.cache_bytes)
        .create(dir.join(data_file(ident.index)))
        .map_err(se)?;
    start(
        db,
        Some(Disk {
            dir,
            wrap,
            part: ident.index,
        }),
        options.salvage_damaged_redo,
        opening,
        ident,
    )
}

/// Checks (or, in a new file, records) which partition of how many the file is; returns the
/// count.
fn check_ident(
    tx: &mut tables::Tx<'_>,
    ident: Ident,
    dir: Option<&Path>,
    fresh: bool,
) -> StoreResult<u32> {
    let meta = tx.meta.get()?;
    let count = meta.get(PARTITIONS).map_err(se)?.map(|v| v.value());
    let index = meta.get(PARTITION).map_err(se)?.map(|v| v.value());
    let name = dir.map_or_else(
        || format!("partition {}", ident.index),
        |d| d.join(data_file(ident.index)).display().to_string(),
    );
    let recorded = match count {
        Some(c) => {
            if index != Some(u64::from(ident.index)) {
                return Err(StoreError::corrupt(
                    name,
                    CodecError::Body(format!(
                        "the file says it is partition {index:?}, where partition {} was expected",
                        ident.index
                    )),
                ));
            }
            u32::try_from(c).unwrap_or(u32::MAX)
        }
        None => {
            // A file written before partitions (layout 3 or older) is a store of one. A file
            // that never had a commit (`fresh`: its creation was cut short) is created now,
            // except a partition after the first of a store that exists: a store's files are
            // created before partition 0's, so such a file was emptied (truncated, replaced by
            // an empty one, or gone and created again), and its actors would silently be gone.
            if fresh && !ident.new && ident.index > 0 {
                return Err(StoreError::corrupt(
                    name,
                    CodecError::Body(format!(
                        "partition {}'s file holds nothing, though its store exists and was created with it: the file was emptied or replaced; restore the directory from a backup",
                        ident.index
                    )),
                ));
            }
            let legacy = !ident.new && ident.index == 0 && !fresh;
            if !ident.new && !legacy && !fresh {
                return Err(StoreError::corrupt(
                    name,
                    CodecError::Body("a partition file that does not say which it is".into()),
                ));
            }
            let c = if legacy {
                1
            } else {
                ident
                    .count
                    .unwrap_or_else(crate::partition::default_partitions)
            };
            meta.insert(PARTITIONS, u64::from(c)).map_err(se)?;
            meta.insert(PARTITION, u64::from(ident.index)).map_err(se)?;
            c
        }
    };
    if let Some(asked) = ident.count
        && asked != recorded
    {
        if ident.index > 0 {
            return Err(StoreError::corrupt(
                name,
                CodecError::Body(format!(
                    "this partition file says its store has {recorded} partitions, and partition 0 says {asked}: files of different stores are mixed"
                )),
            ));
        }
        let at = dir.map_or(String::new(), |d| d.display().to_string());
        return Err(StoreError::InvalidRequest(format!(
            "the store in {at} has {recorded} partition(s), and was opened with partitions={asked}; \
             a store keeps the count it was created with: change it offline with \
             `loom store repartition --store {at} --partitions {asked}`"
        )));
    }
    Ok(recorded)
}

/// Brings an opened database up to date (layout, redo log replay, what a dead process held)
/// and starts its writer.
fn start(
    db: Database,
    disk: Option<Disk<'_>>,
    salvage: bool,
    opening: Opening,
    ident: Ident,
) -> StoreResult<Inner> {
    let part = ident.index;
    let txn = db.begin_write().map_err(se)?;
    tables::create_all(&txn).map_err(se)?;
    let writes = std::cell::Cell::new(0);
    let mut tx = tables::Tx::new(&txn, redo::Sink::new(None, &writes));
    let layout = {
        let meta = tx.meta.get()?;
        let layout = meta.get("layout").map_err(se)?.map(|v| v.value());
        match layout {
            // Older layouts are upgraded in place below, after their redo log is replayed.
            None | Some(1) | Some(2) | Some(3) | Some(4) => {
                meta.insert("layout", LAYOUT_VERSION).map_err(se)?;
            }
            Some(LAYOUT_VERSION) => {}
            // Not damage: a newer build's file, which this one must not write (nor tell its
            // user to restore from a backup).
            Some(other) => {
                return Err(StoreError::InvalidRequest(format!(
                    "the store's data file (partition {part}) is of layout {other}, written by a \
                     newer build of Loom; this build reads layouts up to {LAYOUT_VERSION}: run the \
                     build that wrote it (and its `loom`)"
                )));
            }
        }
        layout
    };
    let (dir, log) = match disk {
        Some(Disk { dir, wrap, part }) => {
            let had_log = tx.meta.get()?.get(writer::REDO_LSN).map_err(se)?.is_some();
            check_log_there(dir, part, had_log, salvage)?;
            let (file, bytes, created) = open_log(dir, part)?;
            // A log is written to (its header first) only after its data file's first commit
            // (`reset_log`): a data file with no commit beside a log with bytes in it was
            // emptied or replaced, and opening it would create an empty partition in its place.
            if layout.is_none() && !bytes.is_empty() {
                return Err(StoreError::corrupt(
                    dir.join(data_file(part)).display().to_string(),
                    CodecError::Body(format!(
                        "the file holds nothing, though its redo log {} shows it was written: it \
                         was emptied or replaced; restore the directory from a backup",
                        redo_file(part)
                    )),
                ));
            }
            (Some(dir), Some((file, bytes, created, wrap)))
        }
        None => (None, None),
    };
    // Batches acknowledged through the redo log since the last checkpoint: applied again,
    // in order, before anything else reads or writes.
    let lsn = match &log {
        Some((_, bytes, _, _)) => {
            let checkpoint = meta_counter(&**tx.meta.get()?, writer::REDO_LSN)?;
            let log_path = dir.as_ref().map(|d| d.join(redo_file(part)));
            // Replay names the log `loom.redo` whichever partition's it is: named here.
            let replayed = redo::replay(bytes, checkpoint, &mut tx).map_err(|e| match e {
                StoreError::Corrupt { what, source } if what == REDO_FILE => StoreError::Corrupt {
                    what: log_path
                        .as_ref()
                        .map_or(redo_file(part), |p| p.display().to_string()),
                    source,
                },
                other => other,
            })?;
            if let Some(damage) = replayed.damage {
                let where_ = log_path
                    .as_ref()
                    .map_or(redo_file(part), |p| p.display().to_string());
                if !salvage {
                    // Nothing is written (the transaction is dropped), and the log stays as
                    // it is for whoever recovers it (rule D4).
                    return Err(StoreError::corrupt(
                        format!("{where_} at byte {}", damage.offset),
                        CodecError::Body(format!(
                            "the redo log is damaged after batch {}, and a later record says \
                                 batches through {} were acknowledged: the store is not opened, \
                                 so that none is silently lost. Restore the directory from a \
                                 backup, or open it without them with `loom redo salvage --store \
                                 {} --yes` (they are kept aside)",
                            damage.after,
                            damage.durable,
                            dir.as_ref()
                                .map_or(String::new(), |d| d.display().to_string())
                        )),
                    ));
                }
                let tail = &bytes[damage.offset as usize..];
                let kept = dir.as_ref().map(|d| keep_dropped(d, part, "damaged", tail));
                // Salvage drops acknowledged batches from the store: only once they are kept
                // aside for whoever recovers them. A copy that could not be made (a full disk)
                // stops it, and nothing is written.
                if let Some(Err(why)) = &kept {
                    return Err(StoreError::storage(
                        tables::BACKEND,
                        std::io::Error::other(format!(
                            "salvage refused: the damaged tail of {where_} must be kept aside before it is dropped, and {why}"
                        )),
                    ));
                }
                tracing::error!(
                    offset = damage.offset,
                    after = damage.after,
                    acknowledged_through = damage.durable,
                    kept = ?kept,
                    "salvaged a damaged redo log: the batches after the damage are dropped"
                );
            }
            if replayed.torn_bytes > 0 {
                let tail = &bytes[bytes.len() - replayed.torn_bytes as usize..];
                let kept = dir.as_ref().map(|d| keep_dropped(d, part, "torn", tail));
                tracing::warn!(
                    bytes = replayed.torn_bytes,
                    kept = ?kept,
                    "dropped the torn tail of the redo log (records written after the last completed sync, never acknowledged)"
                );
            }
            if replayed.skipped_bytes > 0 {
                tracing::warn!(
                    bytes = replayed.skipped_bytes,
                    "skipped damaged bytes of the redo log that held no batch it needed"
                );
            }
            if replayed.records > 0 {
                tracing::info!(
                    records = replayed.records,
                    "replayed the redo log since the last checkpoint"
                );
            }
            tx.meta
                .get()?
                .insert(writer::REDO_LSN, replayed.last_lsn)
                .map_err(se)?;
            replayed.last_lsn
        }
        None => 0,
    };
    if matches!(layout, Some(1) | Some(2)) {
        upgrade_ready_index(&mut tx)?;
    }
    let partitions = check_ident(&mut tx, ident, dir, layout.is_none())?;
    // Only the process holding the directory lock opens the file, so at its first opening the
    // leases and leased messages found here belong to a process that is gone: release them now
    // instead of waiting for them to time out. Tokens are kept, so fencing still holds. (At a
    // reopen they are this process's own, and kept.) Its membership record goes too: the
    // process is not running, whatever its last heartbeat says, and a restart under its name
    // is not refused as if it were.
    let (released, returned) = match opening {
        Opening::First => {
            membership::forget_all(&mut tx)?;
            (lease::release_all(&mut tx)?, mailbox::return_all(&mut tx)?)
        }
        Opening::Again => (0, 0),
    };
    drop(tx);
    if released + returned > 0 {
        tracing::info!(
            released,
            returned,
            "released the leases and leased messages of the previous process"
        );
    }
    txn.commit().map_err(se)?;
    // redb now holds every replayed batch durably: the log can start empty.
    let setup = match (log, &dir) {
        (Some((file, _, created, wrap)), Some(dir)) => {
            reset_log(&file, dir, part, created)?;
            Some(LogSetup {
                file: wrap(file),
                offset: redo::MAGIC.len() as u64,
                lsn,
            })
        }
        _ => None,
    };
    let db = Arc::new(db);
    let durability = Arc::new(Durability::new(lsn));
    let writer = Writer::start(db.clone(), setup, durability.clone())
        .map_err(|e| StoreError::storage(tables::BACKEND, e))?;
    Ok(Inner {
        db,
        writer,
        durability,
        reads: Arc::default(),
        on_disk: dir.is_some(),
        partitions,
    })
}

impl EmbeddedStore {
    /// The data directory, or `None` in memory.
    pub fn dir(&self) -> Option<&Path> {
        self.parts.list[0].dir()
    }

    /// How many partitions the store has.
    pub fn partitions(&self) -> u32 {
        self.parts.list.len() as u32
    }

    /// Messages the relays have moved between partitions since the store opened.
    pub fn relayed(&self) -> u64 {
        self.parts.relays.delivered.load(Ordering::Relaxed)
    }

    /// Each partition's outbox and high-water marks.
    pub async fn outbox_states(&self) -> StoreResult<Vec<OutboxState>> {
        let n = self.partitions();
        let mut out = Vec::new();
        for p in 0..n {
            out.push(
                self.read_in(p, move |txn| relay::state_of(txn, p, n))
                    .await?,
            );
        }
        Ok(out)
    }

    /// Test hook: while `hold` is true the relays move nothing (messages to other partitions
    /// wait in the outboxes), as when the relays are slow or stopped.
    #[cfg(feature = "testing")]
    pub fn hold_relays(&self, hold: bool) {
        self.parts.relays.hooks.hold.store(hold, Ordering::Release);
        if !hold {
            for p in 0..self.partitions() {
                self.parts.relays.wake(p);
            }
        }
    }

    /// Test hook: while `keep` is true the relays move messages but never trim the outboxes, as
    /// if the process died after every move and before its trim.
    #[cfg(feature = "testing")]
    pub fn keep_outboxes(&self, keep: bool) {
        self.parts.relays.hooks.keep.store(keep, Ordering::Release);
    }

    /// Signals a result recorded (and committed) for `key` of `actor`, if more than one
    /// runtime listens: a lone runtime is the one that committed it, and hands its replies to
    /// its callers itself (a signal would only make it look the record up again).
    fn signal_done(&self, actor: &ActorId, key: &crate::id::IdempotencyKey) {
        if self.parts.done.receiver_count() < 2 {
            return;
        }
        let c = crate::store::Completion {
            actor: actor.clone(),
            key: key.clone(),
        };
        // An error only says that no receiver is left, which is no fault.
        let _no_receiver = self.parts.done.send(c);
    }

    /// The receiver of [`signal_done`](Self::signal_done)'s signals.
    fn done_signals(&self) -> tokio::sync::broadcast::Receiver<crate::store::Completion> {
        self.parts.done.subscribe()
    }

    /// The partition of `actor`.
    fn part(&self, actor: &ActorId) -> u32 {
        partition_of(actor, self.partitions())
    }

    /// Commits and requests so far: `requests / commits` is the average group-commit batch.
    /// (Counted since the last opening: a reopen after a failure starts again from zero.)
    /// Summed over the partitions.
    pub fn writer_stats(&self) -> WriterStats {
        let mut stats = WriterStats {
            commits: 0,
            requests: 0,
            checkpoints: 0,
        };
        for part in self.parts.list.iter() {
            let Ok(inner) = part.inner() else { continue };
            let c = &inner.writer.counters;
            stats.commits += c.commits.load(Ordering::Relaxed);
            stats.requests += c.requests.load(Ordering::Relaxed);
            stats.checkpoints += c.checkpoints.load(Ordering::Relaxed);
        }
        stats
    }

    /// Runs a read-only function on partition `p` (see [`read_on`]).
    async fn read_in<R, F>(&self, p: u32, f: F) -> StoreResult<R>
    where
        F: FnOnce(&ReadTransaction) -> StoreResult<R> + Send + 'static,
        R: Send + 'static,
    {
        read_on(&self.parts.list[p as usize], f).await
    }

    /// Runs `f` on every partition, each returning its first `limit` items in `order`, and
    /// merges them: the store's first `limit` in that order.
    async fn read_merged<T, F>(
        &self,
        limit: usize,
        order: impl Fn(&T, &T) -> std::cmp::Ordering,
        f: F,
    ) -> StoreResult<Vec<T>>
    where
        F: Fn(&ReadTransaction) -> StoreResult<Vec<T>> + Clone + Send + 'static,
        T: Send + 'static,
    {
        let mut all = Vec::new();
        for p in 0..self.partitions() {
            all.extend(self.read_in(p, f.clone()).await?);
        }
        all.sort_by(order);
        all.truncate(limit);
        Ok(all)
    }

    /// The recipients of each relay move.
    fn relay_arrivals(&self) -> tokio::sync::broadcast::Receiver<Arc<[ActorId]>> {
        self.parts.relays.arrivals.subscribe()
    }

    /// Runs a write function in the next group commit of `actor`'s partition; returns once it
    /// is durable.
    async fn write<R, F>(&self, actor: &ActorId, f: F) -> StoreResult<R>
    where
        F: FnOnce(&mut tables::Tx<'_>) -> StoreResult<R> + Send + 'static,
        R: Send + 'static,
    {
        self.write_in(self.part(actor), f).await
    }

    /// Runs a write function in the next group commit of partition `p`.
    async fn write_in<R, F>(&self, p: u32, f: F) -> StoreResult<R>
    where
        F: FnOnce(&mut tables::Tx<'_>) -> StoreResult<R> + Send + 'static,
        R: Send + 'static,
    {
        write_on(&self.parts.list[p as usize], f).await
    }
}

/// Runs a read-only function in a fresh read transaction of one partition, off the async
/// threads; returns once what it read is durable.
async fn read_on<R, F>(part: &Arc<reopen::Shared>, f: F) -> StoreResult<R>
where
    F: FnOnce(&ReadTransaction) -> StoreResult<R> + Send + 'static,
    R: Send + 'static,
{
    let inner = part.inner()?;
    let guard = inner.reads.enter(inner.db.clone());
    let durability = inner.durability.clone();
    let (out, seen) = tokio::task::spawn_blocking(move || {
        let txn = guard.db()?.begin_read().map_err(se)?;
        // Read after the transaction began: every batch it can see is at most this one.
        let seen = durability.visible();
        let out = f(&txn);
        drop(txn);
        drop(guard);
        Ok::<_, StoreError>((out, seen))
    })
    .await
    .map_err(|e| StoreError::storage(tables::BACKEND, e))??;
    // What was read is returned only once it is durable (see `redo.rs`).
    inner.durability.wait(seen).await?;
    out
}

/// Runs a write function in the next group commit of one partition; returns once it is
/// durable.
async fn write_on<R, F>(part: &Arc<reopen::Shared>, f: F) -> StoreResult<R>
where
    F: FnOnce(&mut tables::Tx<'_>) -> StoreResult<R> + Send + 'static,
    R: Send + 'static,
{
    part.inner()?.writer.run(f).await
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.dir() {
            Some(d) => write!(f, "EmbeddedStore({})", d.display()),
            None => write!(f, "EmbeddedStore(memory)"),
        }
    }
}

/// Layout 2 to 3: moves the ready index (`READY`, by time) to `READY_BY_KIND`.
fn upgrade_ready_index(tx: &mut tables::Tx<'_>) -> StoreResult<()> {
    let mut entries = Vec::new();
    for item in tx.legacy_ready.get()?.iter().map_err(se)? {
        let (k, _) = item.map_err(se)?;
        let (at, actor) = k.value();
        entries.push((at, actor.to_owned()));
    }
    let ready = tx.legacy_ready.get()?;
    for (at, actor) in &entries {
        ready.remove((*at, actor.as_str())).map_err(se)?;
    }
    for (at, actor) in &entries {
        mailbox::list_ready(tx, actor, *at)?;
    }
    if !entries.is_empty() {
        tracing::info!(
            mailboxes = entries.len(),
            "upgraded the store's ready index to layout {LAYOUT_VERSION}"
        );
    }
    Ok(())
}

/// True if a partition's file holds any journal or mailbox.
fn holds_actors(inner: &Inner) -> StoreResult<bool> {
    let txn = inner.db.begin_read().map_err(se)?;
    let journals = txn.open_table(tables::JOURNAL_META).map_err(se)?;
    let mailboxes = txn.open_table(tables::MAILBOX_META).map_err(se)?;
    Ok(journals.first().map_err(se)?.is_some() || mailboxes.first().map_err(se)?.is_some())
}

/// Reads a `u64` counter in [`META`].
fn meta_counter(table: &impl ReadableTable<&'static str, u64>, name: &str) -> StoreResult<u64> {
    Ok(table.get(name).map_err(se)?.map(|v| v.value()).unwrap_or(0))
}
