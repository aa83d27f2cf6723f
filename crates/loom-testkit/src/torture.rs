//! The torture harness: kill -9 a process running the bank workload, again and again, and prove
//! that nothing it acknowledged was lost or applied twice.
//!
//! The harness runs a *child* command (the bank, on some store) that prints `ack <n>` on stdout
//! each time transfer `n`'s start is acknowledged (its first durable turn done). It kills the
//! child with SIGKILL after a random delay (seeded, so a failing run is reproduced from the seed
//! it prints), optionally kills the store's server too, and starts the child again, `kills`
//! times. Then a *final* child, given the set of acknowledged transfers, checks that none of them
//! was lost (each has started: its status is past `New`), runs everything to completion,
//! verifies the books (total conserved, each account holding exactly the legs of the settled
//! transfers: a leg applied twice or lost shows up there), and reports.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Settings of a torture run.
#[derive(Debug, Clone, Copy)]
pub struct Torture {
    /// How many times the child is killed.
    pub kills: u32,
    /// Seed of the kill schedule.
    pub seed: u64,
    /// Shortest time a child runs before it is killed.
    pub min_run: Duration,
    /// Longest time a child runs before it is killed.
    pub max_run: Duration,
}

/// What the final child reports (one JSON line `report {…}`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FinalReport {
    /// Acknowledged transfers found never started.
    pub lost: Vec<u32>,
    /// Transfers done.
    pub done: u32,
    /// Transfers refused.
    pub refused: u32,
    /// The verification's verdict: `None` if the books balance, else what is wrong.
    pub verify_error: Option<String>,
    /// Actors parked at the end.
    pub parked: Vec<String>,
    /// Journals read back in full and found gapless.
    pub journals: u64,
    /// The first journal found with a gap or an unreadable entry, if any.
    pub journal_error: Option<String>,
}

/// What a torture run found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The seed (rerun with it to reproduce).
    pub seed: u64,
    /// Children killed with SIGKILL.
    pub kills: u32,
    /// Store servers killed with SIGKILL too.
    pub server_kills: u32,
    /// Rounds whose child finished everything before its kill.
    pub finished_early: u32,
    /// Distinct transfers acknowledged by killed children.
    pub acknowledged: usize,
    /// Acknowledged but lost.
    pub lost: usize,
    /// Applied twice (0 when the books balance; any doubling unbalances them).
    pub doubled: usize,
    /// The final child's report.
    pub last: FinalReport,
}

impl Report {
    /// True if every promise held.
    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.doubled == 0
            && self.last.verify_error.is_none()
            && self.last.parked.is_empty()
            && self.last.journal_error.is_none()
    }
}

/// How to run children, and what to do to the store between rounds.
pub trait Target {
    /// A child that runs the bank and prints `ack <n>` lines.
    fn child(&mut self) -> Command;
    /// The final child, given the file listing acknowledged transfers (one number per line).
    fn final_child(&mut self, acked: &Path) -> Command;
    /// Called after each kill with a random number in `0..100`; may kill and restart the
    /// store's server. Returns true if it did.
    fn after_kill(&mut self, _dice: u32) -> bool {
        false
    }
}

/// Runs the torture against `target`.
pub fn run(target: &mut dyn Target, cfg: Torture, scratch: &Path) -> Report {
    let mut rng = fastrand::Rng::with_seed(cfg.seed);
    let acked: Arc<Mutex<BTreeSet<u32>>> = Arc::default();
    let mut server_kills = 0;
    let mut finished_early = 0;
    for round in 0..cfg.kills {
        let mut cmd = target.child();
        // Killed children meet the store mid-fault by design; their warnings about it (the
        // store unreachable, a lease lost) are the expected effect, not news. Errors still show,
        // and RUST_LOG, when set, wins. The final child logs as a user's process would.
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "error");
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn torture child");
        let reader = read_acks(&mut child, acked.clone());
        let span = cfg.max_run.saturating_sub(cfg.min_run).as_millis() as u64;
        let wait = cfg.min_run + Duration::from_millis(rng.u64(0..=span));
        let started = Instant::now();
        let mut early = false;
        while started.elapsed() < wait {
            if child.try_wait().expect("poll child").is_some() {
                early = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if early {
            finished_early += 1;
        } else {
            // SIGKILL: no destructor runs, no buffer is flushed, nothing is released.
            child.kill().expect("kill child");
        }
        let status = child.wait().expect("reap child");
        reader.join().expect("ack reader");
        if early && !status.success() {
            panic!(
                "torture child failed on its own in round {round} (seed {}): {status}",
                cfg.seed
            );
        }
        if target.after_kill(rng.u32(0..100)) {
            server_kills += 1;
        }
    }
    let list = scratch.join("acknowledged.txt");
    {
        let mut f = std::fs::File::create(&list).expect("write the acknowledged list");
        for n in acked.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            writeln!(f, "{n}").expect("write the acknowledged list");
        }
    }
    let out = target
        .final_child(&list)
        .stderr(Stdio::inherit())
        .output()
        .expect("run the final child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: FinalReport = stdout
        .lines()
        .find_map(|l| l.strip_prefix("report "))
        .map(|j| serde_json::from_str(j).expect("final report is JSON"))
        .unwrap_or_else(|| {
            panic!(
                "the final child gave no report (status {}); stdout:\n{stdout}",
                out.status
            )
        });
    let acknowledged = acked.lock().unwrap_or_else(|p| p.into_inner()).len();
    Report {
        seed: cfg.seed,
        kills: cfg.kills - finished_early,
        server_kills,
        finished_early,
        acknowledged,
        lost: last.lost.len(),
        doubled: usize::from(last.verify_error.is_some()),
        last,
    }
}

fn read_acks(child: &mut Child, acked: Arc<Mutex<BTreeSet<u32>>>) -> std::thread::JoinHandle<()> {
    let stdout = child.stdout.take().expect("child stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // A torn last line (the kill landed mid-write) is not an acknowledgement.
            if let Some(n) = line
                .strip_prefix("ack ")
                .and_then(|n| n.trim().parse::<u32>().ok())
                && line.ends_with(char::is_numeric)
            {
                acked.lock().unwrap_or_else(|p| p.into_inner()).insert(n);
            }
        }
    })
}

/// The final check of a bank run after crashes (the torture's final child, the simulator's end
/// of every run), on a runtime over the store the crashed runs used: no transfer in `acked` was
/// lost (each has started: its status is past `New`); then every transfer is started (those
/// never acknowledged may never have begun) and settled; the books are verified (total
/// conserved, each account holding exactly the legs of the settled transfers, so a leg applied
/// twice or lost shows); nothing is parked; every journal reads back gapless from its trim point
/// to its highest seq, is trimmed no further than its oldest kept snapshot, and there is one
/// for every account and transfer.
///
/// Requests that fail are asked again every 100 ms (the store may still be recovering), so a
/// caller bounds the whole check with a timeout of its own. Shuts `rt` down before it reads the
/// journals, so that nothing writes while they are read.
pub async fn check_bank(
    rt: &loom_core::Runtime,
    bank: &loom_bench::bank::Bank,
    acked: &BTreeSet<u32>,
) -> Result<FinalReport, loom_core::StoreError> {
    use futures::{StreamExt, TryStreamExt};
    use loom_bench::bank::{Status, Transfer, TransferMsg};

    let retry = |what: &'static str| async move {
        tracing::debug!("bank check: {what} failed; asking again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut report = FinalReport::default();
    let statuses: Vec<Result<(u32, Status), loom_core::StoreError>> =
        futures::stream::iter(acked.iter().copied())
            .map(|i| async move {
                let transfer = rt
                    .actor::<Transfer>(format!("t{i}"))
                    .map_err(|e| loom_core::StoreError::InvalidRequest(e.to_string()))?;
                loop {
                    match transfer.ask(TransferMsg::Status).await {
                        Ok(s) => return Ok((i, s)),
                        Err(_) => retry("a status").await,
                    }
                }
            })
            .buffer_unordered(bank.concurrency.max(1))
            .collect()
            .await;
    for s in statuses {
        if let (i, Status::New) = s? {
            report.lost.push(i);
        }
    }
    report.lost.sort();
    while bank.start_all(rt, || {}).await.is_err() {
        retry("starting the rest").await;
    }
    let statuses = loop {
        match bank.settle(rt, Duration::from_secs(600), |_| {}).await {
            Ok(s) => break s,
            Err(_) => retry("settling").await,
        }
    };
    match bank.verify(rt, &statuses).await {
        Ok(v) => {
            report.done = v.done;
            report.refused = v.refused;
        }
        Err(e) => report.verify_error = Some(e.to_string()),
    }
    report.parked = rt
        .parked()
        .await?
        .into_iter()
        .map(|(a, p)| format!("{a}: {}", p.reason))
        .collect();
    let store = rt.store().clone();
    rt.shutdown().await;
    let mut after = None;
    loop {
        let page = store.list_actors(after.as_ref(), 1000).await?;
        let Some(last) = page.last().cloned() else {
            break;
        };
        for a in page {
            let info = store.info(&a).await?;
            let mut expect = info.trimmed_through + 1;
            let mut entries = store.read(&a, loom_core::SeqRange::all());
            let mut problem = None;
            loop {
                match entries.try_next().await {
                    Ok(Some(e)) if e.seq == expect => expect += 1,
                    Ok(Some(e)) => {
                        problem = Some(format!("{a}: expected seq {expect}, found {}", e.seq));
                        break;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        problem = Some(format!("{a}: {e}"));
                        break;
                    }
                }
            }
            if problem.is_none()
                && let Some(&oldest) = info.snapshots.first()
                && oldest < info.trimmed_through
            {
                // Rule D10: a trim never passes the oldest kept snapshot.
                problem = Some(format!(
                    "{a}: trimmed through {}, past its oldest kept snapshot at {oldest}",
                    info.trimmed_through
                ));
            }
            if problem.is_none() && expect != info.highest + 1 {
                problem = Some(format!(
                    "{a}: entries end at {}, highest is {}",
                    expect - 1,
                    info.highest
                ));
            }
            if let Some(p) = problem {
                report.journal_error.get_or_insert(p);
            }
            report.journals += 1;
        }
        after = Some(last);
    }
    let expected = u64::from(bank.accounts) + u64::from(bank.transfers);
    if report.journals < expected && report.journal_error.is_none() {
        // Every account was opened and every transfer started: each has a journal.
        report.journal_error = Some(format!(
            "{} journals listed, expected at least {expected} (the accounts and transfers)",
            report.journals
        ));
    }
    Ok(report)
}
