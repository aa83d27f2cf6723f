//! The embedded store: the default backend, crash-safe in one data directory, no server.
//!
//! Built on [redb](https://docs.rs/redb) (copy-on-write B-trees, checksummed commits, ACID), with
//! **group commit** (see `writer.rs`): concurrent requests from any number of actors share one
//! write transaction and one fsync, and each caller's future completes only after that commit is
//! durable.
//!
//! The directory holds `loom.redb` (the data) and `LOCK`, whose `flock` keeps a second process
//! out; the refused process gets [`StoreError::Locked`] naming the directory and the holder.
//!
//! [`EmbeddedStore::in_memory`] runs the same engine and the same code on memory instead of a file:
//! that is the in-memory backend, for tests and examples that need no durability.

mod idempotency;
mod journal;
mod lease;
mod lock;
mod mailbox;
pub mod tables;
mod turn;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable};

use crate::codec::CodecError;
use crate::error::{StoreError, StoreResult};

pub use lock::LOCK_FILE;
use lock::{DirLock, with_path};
/// redb's file backend and backend trait, for [`EmbeddedStore::on_backend`].
pub use redb::StorageBackend;
pub use redb::backends::FileBackend;
use tables::{LAYOUT_VERSION, se};
use writer::Writer;

/// Name of the data file inside the data directory.
pub const DATA_FILE: &str = "loom.redb";

/// Settings of the embedded store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddedOptions {
    /// Bytes of redb page cache (default 32 MiB). Reads beyond it go to the OS page cache; it
    /// bounds the store's share of the process's memory however long the journals read are.
    pub cache_bytes: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            cache_bytes: 32 * 1024 * 1024,
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
///     store.append(&id, 1, &[Entry::new(1, EntryKind::Failed { error: "x".into() })]).await?;
/// }
/// // Reopened, the append is there.
/// let store = EmbeddedStore::open(dir.path())?;
/// assert_eq!(store.highest_seq(&id).await?, 1);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Database>,
    writer: Writer,
    reads: Arc<Reads>,
    dir: Option<PathBuf>,
    // Dropped after the database (fields drop in order), so the lock outlives every write.
    _lock: Option<DirLock>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.writer.shutdown();
        // A read whose caller went away (its task was aborted, say) still runs to the end on
        // a blocking thread, holding the database: wait for it, so that once the last handle
        // is dropped the directory can be opened again at once.
        self.reads.wait_idle();
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
    /// Durable commits (each one fsync).
    pub commits: u64,
    /// Write requests acknowledged by those commits.
    pub requests: u64,
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
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::storage(tables::BACKEND, with_path(e, dir)))?;
        let lock = DirLock::acquire(dir)?;
        let db = Database::builder()
            .set_cache_size(options.cache_bytes)
            .create(dir.join(DATA_FILE))
            .map_err(se)?;
        Self::start(db, Some(dir.to_path_buf()), Some(lock))
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
    pub fn on_backend(
        backend: impl redb::StorageBackend,
        options: EmbeddedOptions,
    ) -> StoreResult<Self> {
        let db = Database::builder()
            .set_cache_size(options.cache_bytes)
            .create_with_backend(backend)
            .map_err(se)?;
        Self::start(db, None, None)
    }

    /// A store in memory: the same engine and rules, nothing on disk, gone when dropped.
    pub fn in_memory() -> StoreResult<Self> {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(se)?;
        Self::start(db, None, None)
    }

    fn start(db: Database, dir: Option<PathBuf>, lock: Option<DirLock>) -> StoreResult<Self> {
        let txn = db.begin_write().map_err(se)?;
        tables::create_all(&txn).map_err(se)?;
        let mut tx = tables::Tx::new(&txn);
        {
            let meta = tx.meta.get()?;
            let layout = meta.get("layout").map_err(se)?.map(|v| v.value());
            match layout {
                None => {
                    meta.insert("layout", LAYOUT_VERSION).map_err(se)?;
                }
                Some(LAYOUT_VERSION) => {}
                Some(other) => {
                    return Err(StoreError::corrupt(
                        "store layout",
                        CodecError::UnknownVersion {
                            found: u8::try_from(other).unwrap_or(u8::MAX),
                        },
                    ));
                }
            }
        }
        // Only the process holding the directory lock opens the file, so leases and leased
        // messages found here belong to a process that is gone: release them now instead of
        // waiting for them to time out. Tokens are kept, so fencing still holds.
        let released = lease::release_all(&mut tx)?;
        let returned = mailbox::return_all(&mut tx)?;
        drop(tx);
        if released + returned > 0 {
            tracing::info!(
                released,
                returned,
                "released the leases and leased messages of the previous process"
            );
        }
        txn.commit().map_err(se)?;
        let db = Arc::new(db);
        let writer =
            Writer::start(db.clone()).map_err(|e| StoreError::storage(tables::BACKEND, e))?;
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                db,
                writer,
                reads: Arc::default(),
                dir,
                _lock: lock,
            }),
        })
    }

    /// The data directory, or `None` in memory.
    pub fn dir(&self) -> Option<&Path> {
        self.inner.dir.as_deref()
    }

    /// Commits and requests so far: `requests / commits` is the average group-commit batch.
    pub fn writer_stats(&self) -> WriterStats {
        let c = &self.inner.writer.counters;
        WriterStats {
            commits: c.commits.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
        }
    }

    /// Runs a read-only function in a fresh read transaction, off the async threads.
    async fn read<R, F>(&self, f: F) -> StoreResult<R>
    where
        F: FnOnce(&ReadTransaction) -> StoreResult<R> + Send + 'static,
        R: Send + 'static,
    {
        let guard = self.inner.reads.enter(self.inner.db.clone());
        tokio::task::spawn_blocking(move || {
            let txn = guard.db()?.begin_read().map_err(se)?;
            let out = f(&txn);
            drop(txn);
            drop(guard);
            out
        })
        .await
        .map_err(|e| StoreError::storage(tables::BACKEND, e))?
    }

    /// Runs a write function in the next group commit; returns once it is durable.
    async fn write<R, F>(&self, f: F) -> StoreResult<R>
    where
        F: FnOnce(&mut tables::Tx<'_>) -> StoreResult<R> + Send + 'static,
        R: Send + 'static,
    {
        self.inner.writer.run(f).await
    }
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner.dir {
            Some(d) => write!(f, "EmbeddedStore({})", d.display()),
            None => write!(f, "EmbeddedStore(memory)"),
        }
    }
}

/// Reads a `u64` counter in [`META`].
fn meta_counter(table: &impl ReadableTable<&'static str, u64>, name: &str) -> StoreResult<u64> {
    Ok(table.get(name).map_err(se)?.map(|v| v.value()).unwrap_or(0))
}
