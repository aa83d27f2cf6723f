//! The data directory's lock file: one process at a time, and the refused one learns who holds it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{StoreError, StoreResult};
use crate::time::Timestamp;

use super::tables::BACKEND;

/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = "LOCK";

/// An exclusive lock on a data directory, held until dropped (or the process dies: the kernel
/// releases `flock` locks with the process, so a crash never leaves a stale lock).
#[derive(Debug)]
pub(super) struct DirLock {
    // Held for its lock; closing the file releases it.
    _file: File,
}

impl DirLock {
    /// Takes the lock on `dir`, or says who has it.
    pub(super) fn acquire(dir: &Path) -> StoreResult<DirLock> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| StoreError::storage(BACKEND, with_path(e, &path)))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                file.read_to_string(&mut holder)
                    .map_err(|e| StoreError::storage(BACKEND, with_path(e, &path)))?;
                let holder = holder.trim();
                return Err(StoreError::Locked {
                    dir: dir.to_path_buf(),
                    holder: if holder.is_empty() {
                        "another process (its lock file is still being written)".to_owned()
                    } else {
                        holder.to_owned()
                    },
                });
            }
            Err(TryLockError::Error(e)) => {
                return Err(StoreError::storage(BACKEND, with_path(e, &path)));
            }
        }
        let exe = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "an unknown program".to_owned());
        let holder = format!(
            "process {} ({exe}) on host {}, since {}",
            std::process::id(),
            hostname(),
            Timestamp::now()
        );
        let write = |file: &mut File| -> std::io::Result<()> {
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(holder.as_bytes())?;
            file.sync_data()
        };
        write(&mut file).map_err(|e| StoreError::storage(BACKEND, with_path(e, &path)))?;
        Ok(DirLock { _file: file })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// An I/O error that names the file it happened on.
pub(super) fn with_path(e: std::io::Error, path: &Path) -> PathError {
    PathError {
        path: path.to_path_buf(),
        source: e,
    }
}

/// An I/O error on a named file.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub(super) struct PathError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}
