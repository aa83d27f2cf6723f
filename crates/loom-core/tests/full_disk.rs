//! A full disk under the embedded store, on a small tmpfs mounted for the test (as root, which
//! CI is; elsewhere the test says why it skips): the failure is reported (typed errors at once,
//! `Runtime::health` with what to do, sentences from the examples), and once space is freed the
//! store opens again by itself and nothing acknowledged is lost.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use loom_core::runtime::{AskError, AskOptions, Compaction, Runtime, StoreHealth};
use loom_testkit::runtime::{Account, AccountMsg, Probe};

/// A tmpfs of `size` mounted at `dir`, unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn new(dir: &Path, size: &str) -> Result<Mount, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Mount(dir.to_owned()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg("-l").arg(&self.0).status();
        if !unmounted.as_ref().is_ok_and(|s| s.success()) {
            eprintln!("could not unmount {}: {unmounted:?}", self.0.display());
        }
    }
}

/// Mounts, or says why this test cannot run here.
fn mount(dir: &Path, size: &str) -> Option<Mount> {
    match Mount::new(dir, size) {
        Ok(m) => Some(m),
        Err(e) => {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs at {} ({e}); run as root to test a full disk",
                dir.display()
            );
            None
        }
    }
}

/// Fills the file system with a ballast file, then frees `leave` bytes of it.
fn fill(dir: &Path, leave: u64) -> PathBuf {
    use std::io::Write;
    let path = dir.join("ballast");
    let mut f = std::fs::File::create(&path).expect("ballast");
    let chunk = vec![7u8; 64 * 1024];
    let mut written = 0u64;
    while f.write_all(&chunk).is_ok() {
        written += chunk.len() as u64;
    }
    drop(f);
    let keep = written.saturating_sub(leave);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(keep))
        .expect("free some space");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_and_writes_resume_once_space_is_freed() {
    let base = tempfile::tempdir().expect("temp dir");
    let Some(_mount) = mount(&base.path().join("fs"), "12m") else {
        return;
    };
    let fs = base.path().join("fs");
    // The state grows by repeated text, which zstd would shrink to almost nothing: written
    // plain, each turn takes the disk space this test counts on. (Its own process: the other
    // test here runs the bank in a child process.)
    loom_core::codec::set_compression(false);
    let probe = Arc::new(Probe::default());
    let rt = Runtime::builder()
        .embedded(fs.join("data"))
        .register_actor(Account {
            probe: probe.clone(),
        })
        .configure(|c| {
            c.compaction = Compaction::DISABLED;
            // Long, so that waiting it out would show.
            c.ask_timeout = Duration::from_secs(120);
        })
        .start()
        .await
        .expect("runtime");
    let a = rt.actor::<Account>("alice").unwrap();
    assert_eq!(a.ask(AccountMsg::Deposit(1)).await.unwrap(), 1);
    let ballast = fill(&fs, 2 << 20);
    // Each turn journals the whole grown state: the disk fills within a few.
    let chunk = 200_000;
    let mut grown = 0;
    let failure = loop {
        let asked = Instant::now();
        match a.ask(AccountMsg::Grow(chunk)).await {
            Ok(len) => {
                grown += 1;
                assert_eq!(len as usize, grown * chunk);
                assert!(grown < 100, "the disk never filled");
            }
            Err(e) => break (e, asked.elapsed()),
        }
    };
    let (error, took) = failure;
    eprintln!("after {grown} growths the disk filled: {error} ({took:?})");
    assert!(
        !matches!(error, AskError::Timeout { .. }) && took < Duration::from_secs(30),
        "the ask waited {took:?} and ended with {error:?} instead of failing at once"
    );
    // Failing, or degraded if a small write (a heartbeat) got through between its failures.
    match rt.health().store {
        StoreHealth::Failing { hint, error, .. } | StoreHealth::Degraded { hint, error, .. } => {
            assert!(
                hint.as_deref().is_some_and(|h| h.contains("is full")),
                "{error}: {hint:?}"
            )
        }
        StoreHealth::Healthy => panic!("a full disk left the runtime healthy"),
    }
    // Space freed: the store opens again by itself, and the actor goes on.
    std::fs::remove_file(&ballast).expect("free the disk");
    let deadline = Instant::now() + Duration::from_secs(60);
    let balance = loop {
        let opts = AskOptions {
            timeout: Some(Duration::from_secs(5)),
            ..AskOptions::default()
        };
        match a.ask_with(AccountMsg::Balance, opts).await {
            Ok(b) => break b,
            Err(e) => assert!(Instant::now() < deadline, "never recovered: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(balance, 1);
    // Healthy (or degraded, if failures came between successes) once writes succeed.
    let healthy_by = Instant::now() + Duration::from_secs(15);
    while !rt.health().is_healthy() {
        assert!(Instant::now() < healthy_by, "{:?}", rt.health());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every acknowledged change is there, and the one that failed was applied at most once
    // (its message may have waited for the store and run after it came back).
    let filler = a.ask(AccountMsg::Grow(0)).await.unwrap() as usize;
    assert!(
        filler == grown * chunk || filler == (grown + 1) * chunk,
        "{filler} bytes of state after {grown} acknowledged growths of {chunk}"
    );
    rt.shutdown().await;
}

/// The bank example, as a user ran it on a small file system: it must stop with a sentence
/// that says the disk is full and what to do, not hang or print a `Debug` dump.
#[test]
fn the_bank_on_a_full_disk_says_so_in_a_sentence() {
    let base = tempfile::tempdir().expect("temp dir");
    let Some(_mount) = mount(&base.path().join("fs"), "3m") else {
        return;
    };
    let bank = loom_testkit::examples::example("bank");
    let out = Command::new(&bank)
        .args(["--accounts", "20", "--transfers", "3000", "--data"])
        .arg(base.path().join("fs").join("bank"))
        .output()
        .expect("run the bank");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the bank fit on 3 MB: {stderr}");
    assert!(
        stderr.contains("error: ") && stderr.contains("No space left on device"),
        "{stderr}"
    );
    assert!(
        stderr.contains("what to do: the disk holding the store is full"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("Storage {") && !stderr.contains("Os {"),
        "a Debug dump: {stderr}"
    );
}
