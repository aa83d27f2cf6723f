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
    // Held for its lock, which dropping it releases.
    file: File,
}

/// Unlocks explicitly instead of leaving it to the close. A `flock` lock belongs to the open
/// file, which a child process that another thread is starting shares from its fork until it
/// runs its program: closed here meanwhile, the directory would stay locked until then, and a
/// program that opens it right after (a `loom` command run by the application that just shut
/// its store) would be refused by a lock nobody holds. An unlock through any copy releases it
/// for all.
impl Drop for DirLock {
    fn drop(&mut self) {
        if let Err(e) = self.file.unlock() {
            // The close right after releases it once every copy is closed.
            tracing::warn!(error = %e, "could not unlock the data directory's lock file; it is released when the file is closed");
        }
    }
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
        Ok(DirLock { file })
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

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    use super::*;

    /// A child being launched on another thread shares the lock's open file until it runs its
    /// program: the lock dropped meanwhile is released at once all the same, not when the
    /// child gets to `exec`.
    #[test]
    fn a_lock_shared_with_a_child_being_launched_is_released_when_dropped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let lock = DirLock::acquire(dir.path()).expect("lock");
        let (mut forked, tell) = std::io::pipe().expect("pipe");
        let launcher = std::thread::spawn(move || {
            let mut cmd = Command::new("true");
            // SAFETY: between fork and exec the child only calls write(2) and nanosleep(2),
            // both async-signal-safe, and allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    (&tell).write_all(b"f")?;
                    std::thread::sleep(std::time::Duration::from_secs(2));
                    Ok(())
                });
            }
            cmd.status()
        });
        let mut byte = [0u8; 1];
        forked.read_exact(&mut byte).expect("the child was forked");
        // The child holds a copy of the lock's open file for two more seconds.
        drop(lock);
        DirLock::acquire(dir.path())
            .expect("the lock, released though the child still holds the file");
        let status = launcher.join().expect("launcher").expect("child ran");
        assert!(status.success());
    }
}
