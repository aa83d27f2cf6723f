//! Reopening after a storage failure (rule D3 of RELIABILITY.md).
//!
//! Once the redo log or a commit fails (a full disk, an I/O error), the store refuses every
//! request (`writer.rs`, `redo.rs`), and redb itself refuses writes until the database is
//! opened again. So the first request that meets the failure starts a background thread that
//! reopens the store, with backoff, until it opens: the failed opening is dropped (its writer
//! stopped, its database closed), the directory opened again (the redo log replayed, as after
//! a crash), and requests go to the new opening. Nothing acknowledged is lost on the way:
//! acknowledged batches are in the log or in redb, and the failed opening acknowledged nothing
//! after its failure.
//!
//! Invariants:
//! - At a reopen the leases and leased messages in the file are this process's own, still in
//!   use: they are kept (the first opening releases them, as a dead process's).
//! - At most one opening of the directory exists at a time: the old one is dropped (every
//!   handle to it gone, its database closed) before the next one is opened, and the
//!   directory's lock is held throughout (it belongs to the store, not to an opening).
//! - While the store is between openings every request fails at once with a `Storage` error
//!   that says so; none waits.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::error::{StoreError, StoreResult};

use super::lock::DirLock;
use super::tables::BACKEND;
use super::{EmbeddedOptions, Ident, Inner, Opening, Wrap, open_dir};

/// The first wait before a reopen; it doubles after each failed attempt.
const FIRST_WAIT: Duration = Duration::from_millis(500);

/// The longest wait between attempts.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// What a store on disk needs to open its directory again.
pub(super) struct Disk {
    pub(super) dir: PathBuf,
    pub(super) options: EmbeddedOptions,
    pub(super) wrap: Wrap,
    /// Which partition this is, of how many.
    pub(super) ident: Ident,
    /// Held as long as the store (every partition holds it): no other process opens the
    /// directory between openings.
    pub(super) _lock: Arc<DirLock>,
}

/// What every clone of an [`EmbeddedStore`](super::EmbeddedStore) shares.
pub(super) struct Shared {
    /// The current opening; `None` between a failed one and the next.
    current: RwLock<Option<Arc<Inner>>>,
    /// Set while a reopen thread runs.
    reopening: AtomicBool,
    /// Why the store is between openings, for the errors requests get meanwhile.
    why: Mutex<Option<StoreError>>,
    /// When the last reopen succeeded, and the wait before it: a store that fails again soon
    /// after waits longer before its next attempt, so that a disk hovering near full does not
    /// make it reopen twice a second.
    last: Mutex<Option<(Instant, Duration)>>,
    // Dropped after `current` (fields drop in order): the lock outlives every opening.
    disk: Option<Disk>,
}

impl Shared {
    pub(super) fn new(inner: Inner, disk: Option<Disk>) -> Arc<Shared> {
        Arc::new(Shared {
            current: RwLock::new(Some(Arc::new(inner))),
            reopening: AtomicBool::new(false),
            why: Mutex::new(None),
            last: Mutex::new(None),
            disk,
        })
    }

    pub(super) fn dir(&self) -> Option<&Path> {
        self.disk.as_ref().map(|d| d.dir.as_path())
    }

    /// The current opening. If it has failed, a reopen is started (once); requests still go
    /// to it, and fail as it fails, until the reopen replaces it.
    pub(super) fn inner(self: &Arc<Self>) -> StoreResult<Arc<Inner>> {
        let current = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match current {
            Some(inner) => {
                if let Some(e) = inner.durability.failure() {
                    self.reopen_soon(&e);
                }
                Ok(inner)
            }
            // The failure that started the reopen, or the last attempt's, as the cause.
            None => Err(StoreError::storage(
                BACKEND,
                Reopening(
                    self.why
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone()
                        .unwrap_or(StoreError::Closed),
                ),
            )),
        }
    }

    fn reopen_soon(self: &Arc<Self>, failure: &StoreError) {
        let Some(disk) = &self.disk else { return };
        if !disk.options.reopen_after_failure || self.reopening.swap(true, Ordering::AcqRel) {
            return;
        }
        *self.why.lock().unwrap_or_else(|p| p.into_inner()) = Some(failure.clone());
        tracing::error!(dir = %disk.dir.display(), error = %failure, "the embedded store failed; it reopens itself in the background once it can");
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("loom-embedded-reopen".into())
            .spawn(move || reopen(&weak));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "could not start the thread that reopens the embedded store; it stays failed until the process opens it again");
        }
    }
}

/// The store is between openings after this failure.
#[derive(Debug, thiserror::Error)]
#[error(
    "the embedded store is reopening after a failure ({0}); requests fail until it opens again"
)]
struct Reopening(#[source] StoreError);

/// Reopens the store behind `weak` until it opens, or the store is dropped.
fn reopen(weak: &Weak<Shared>) {
    let recent = weak
        .upgrade()
        .and_then(|s| *s.last.lock().unwrap_or_else(|p| p.into_inner()));
    let mut wait = match recent {
        Some((at, last)) if at.elapsed() < MAX_WAIT * 2 => (last * 2).min(MAX_WAIT),
        _ => FIRST_WAIT,
    };
    let mut attempts = 0u32;
    loop {
        std::thread::sleep(wait);
        let Some(shared) = weak.upgrade() else { return };
        let Some(disk) = &shared.disk else { return };
        // Take the failed opening out (requests now fail at once), and wait for every handle
        // to it to go, so that its database is closed before the directory is opened again.
        let old = shared
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(old) = old {
            let since = Instant::now();
            let mut warned = false;
            while Arc::strong_count(&old) > 1 {
                if !warned && since.elapsed() > MAX_WAIT {
                    warned = true;
                    tracing::warn!(
                        "requests still hold the failed embedded store; waiting for them"
                    );
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            drop(old);
        }
        attempts += 1;
        match open_dir(
            &disk.dir,
            disk.ident,
            disk.options,
            &disk.wrap,
            Opening::Again,
        ) {
            Ok(inner) => {
                *shared.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(inner));
                *shared.last.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((Instant::now(), wait));
                shared.reopening.store(false, Ordering::Release);
                tracing::info!(dir = %disk.dir.display(), attempts, "the embedded store opened again and takes writes");
                return;
            }
            Err(e) => {
                *shared.why.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
                tracing::warn!(dir = %disk.dir.display(), error = %e, next_in = ?wait * 2, "the embedded store could not open again yet");
                wait = (wait * 2).min(MAX_WAIT);
            }
        }
    }
}
