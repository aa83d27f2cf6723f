//! Node processes for `loom-dev torture-nodes` and `loom-dev bench bank --nodes`: each is
//! `loom-dev node`, hosting the bank's kinds on a shared store under a name of its own, until
//! its stdin closes.
//!
//! The parent talks to a node over its stdin and stdout, a line each way: `metrics` is
//! answered with `metrics <invocations> <cpu microseconds>` (the runtime's invocation count
//! and the process's CPU time so far); the end of stdin makes the node shut down gracefully
//! (drain, release its leases, leave the roster) and exit.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use loom_bench::bank::Bank;
use loom_cli::store::{StoreUrl, open_or_create};
use loom_core::partition::{owner_of, ownership_partitions};
use loom_core::runtime::Runtime;
use loom_core::{ActorId, Store};

use crate::output::Failure;

/// How to start a node.
pub struct Spec {
    /// The store's URL.
    pub store: String,
    /// The Redis key prefix and PostgreSQL schema.
    pub namespace: String,
    /// Each node's lease ttl and message visibility.
    pub lease: Duration,
    /// The nodes' log filter, unless `RUST_LOG` is set.
    pub log: &'static str,
}

struct Running {
    name: String,
    child: Child,
    stdout: BufReader<ChildStdout>,
}

/// The node processes of a run.
pub struct Nodes {
    exe: PathBuf,
    spec: Spec,
    running: Vec<Running>,
}

impl Nodes {
    /// No node yet.
    pub fn new(spec: Spec) -> Result<Self, Failure> {
        Ok(Nodes {
            exe: std::env::current_exe()?,
            spec,
            running: Vec::new(),
        })
    }

    fn spawn(&self, name: &str) -> Result<Running, Failure> {
        let mut c = Command::new(&self.exe);
        c.args(["node", "--store", &self.spec.store, "--node", name])
            .args(["--redis-prefix", &self.spec.namespace])
            .args(["--pg-schema", &self.spec.namespace])
            .args(["--lease-ms", &self.spec.lease.as_millis().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if std::env::var_os("RUST_LOG").is_none() {
            c.env("RUST_LOG", self.spec.log);
        }
        let mut child = c
            .spawn()
            .map_err(|e| Failure(format!("could not start node {name}: {e}")))?;
        let stdout = BufReader::new(child.stdout.take().expect("a piped stdout"));
        Ok(Running {
            name: name.to_owned(),
            child,
            stdout,
        })
    }

    /// Starts a node named `name`.
    pub fn add(&mut self, name: &str) -> Result<(), Failure> {
        let r = self.spawn(name)?;
        self.running.push(r);
        Ok(())
    }

    /// How many run.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// Their names, in the order they were added.
    pub fn names(&self) -> Vec<&str> {
        self.running.iter().map(|r| r.name.as_str()).collect()
    }

    /// SIGKILLs node `i` and starts it again under its name; returns when and whom it killed.
    pub fn kill_and_restart(&mut self, i: usize) -> Result<(Instant, String), Failure> {
        let name = self.running[i].name.clone();
        let at = Instant::now();
        // SIGKILL: no destructor runs, nothing is released, the node does not leave.
        let child = &mut self.running[i].child;
        child
            .kill()
            .and_then(|()| child.wait())
            .map_err(|e| Failure(format!("could not kill node {name}: {e}")))?;
        self.running[i] = self.spawn(&name)?;
        Ok((at, name))
    }

    /// The nodes' invocations and CPU time so far, summed.
    pub fn metrics(&mut self) -> Result<(u64, Duration), Failure> {
        let (mut invocations, mut cpu) = (0, Duration::ZERO);
        for r in &mut self.running {
            let failed = |e: std::io::Error| Failure(format!("node {}: {e}", r.name));
            let stdin = r.child.stdin.as_mut().expect("a piped stdin");
            stdin
                .write_all(b"metrics\n")
                .and_then(|()| stdin.flush())
                .map_err(failed)?;
            let mut line = String::new();
            r.stdout.read_line(&mut line).map_err(failed)?;
            let mut words = line.split_whitespace();
            let (Some("metrics"), Some(n), Some(us)) = (words.next(), words.next(), words.next())
            else {
                return Err(Failure(format!(
                    "node {} answered {line:?} to `metrics`",
                    r.name
                )));
            };
            let parse = |w: &str| {
                w.parse::<u64>()
                    .map_err(|e| Failure(format!("node {}: {w:?}: {e}", r.name)))
            };
            invocations += parse(n)?;
            cpu += Duration::from_micros(parse(us)?);
        }
        Ok((invocations, cpu))
    }

    /// Closes every node's stdin, which makes it shut down gracefully, and waits up to 30 s
    /// for each; returns those that did not stop by then (killed) or failed.
    pub fn stop(mut self) -> Vec<String> {
        let mut running = std::mem::take(&mut self.running);
        for r in &mut running {
            drop(r.child.stdin.take());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut stuck = Vec::new();
        for mut r in running {
            loop {
                match r.child.try_wait() {
                    Ok(Some(status)) if status.success() => break,
                    Ok(Some(status)) => {
                        stuck.push(format!("{} ({status})", r.name));
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Ok(None) => {
                        let killed = r.child.kill().and_then(|()| r.child.wait().map(drop));
                        stuck.push(format!("{} (did not stop; killed: {killed:?})", r.name));
                        break;
                    }
                    Err(e) => {
                        stuck.push(format!("{} ({e})", r.name));
                        break;
                    }
                }
            }
        }
        stuck
    }
}

impl Drop for Nodes {
    /// Nodes not stopped (a run that failed half-way) are killed, so that none outlives it.
    fn drop(&mut self) {
        for r in &mut self.running {
            if let Ok(None) = r.child.try_wait()
                && let Err(e) = r.child.kill().and_then(|()| r.child.wait().map(drop))
            {
                eprintln!("could not kill node {}: {e}", r.name);
            }
        }
    }
}

/// The live nodes' names, sorted, once they are `expected` or after `limit`.
pub async fn live_nodes(
    store: &dyn Store,
    expected: &[String],
    limit: Duration,
) -> Result<Vec<String>, Failure> {
    let deadline = Instant::now() + limit;
    loop {
        let roster = store.members().await?;
        let mut live: Vec<String> = roster.live().map(|m| m.node.clone()).collect();
        live.sort();
        if live == expected || Instant::now() > deadline {
            return Ok(live);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks who owns each partition of every kind the live nodes host: a (kind, partition) is
/// wrong if its lease is not held by the live node that rendezvous hashing over the kind's live
/// hosts names (no holder, a gone node, or another live one). Looks again every 100 ms until
/// nothing is wrong or `limit` has passed (a node that just joined is handed its partitions
/// within a few looks); returns how many were checked and what was wrong at the last look.
pub async fn partition_owners(
    store: &dyn Store,
    limit: Duration,
) -> Result<(usize, Vec<String>), Failure> {
    let deadline = Instant::now() + limit;
    let parts = ownership_partitions(store.partitions());
    loop {
        let roster = store.members().await?;
        let kinds: std::collections::BTreeSet<&str> = roster
            .live()
            .flat_map(|m| m.kinds.iter().map(String::as_str))
            .collect();
        let mut checked = 0;
        let mut wrong = Vec::new();
        for kind in kinds {
            let hosts: Vec<&str> = roster.hosts(kind).map(|m| m.node.as_str()).collect();
            for p in 0..parts {
                checked += 1;
                let want = owner_of(hosts.iter().copied(), kind, p);
                let held = store.holder(&ActorId::partition_lease(kind, p)).await?;
                let got = held.as_ref().map(|l| l.owner.as_str());
                if got != want {
                    wrong.push(format!("{kind}.{p}: held by {got:?}, won by {want:?}"));
                }
            }
        }
        if wrong.is_empty() || Instant::now() > deadline {
            return Ok((checked, wrong));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `loom-dev node`: hosts the bank's kinds on `url` as `node`, answering `metrics` lines on
/// stdin, until stdin closes; then shuts down gracefully.
pub async fn node(url: &StoreUrl, node: &str, lease_ms: u64) -> Result<(), Failure> {
    let opened = open_or_create(url).await?;
    let lease = Duration::from_millis(lease_ms);
    let rt = Bank::register(Runtime::builder().store(opened.store))
        .configure(|c| {
            c.node = node.to_owned();
            c.lease_ttl = lease;
            c.visibility = lease;
            c.ask_timeout = Duration::from_secs(600);
        })
        .start()
        .await?;
    let metrics = rt.clone();
    let served = tokio::task::spawn_blocking(move || {
        let mut out = std::io::stdout().lock();
        for line in std::io::stdin().lock().lines() {
            match line?.trim() {
                "metrics" => {
                    let cpu = loom_bench::report::process_cpu().as_micros();
                    writeln!(out, "metrics {} {cpu}", metrics.metrics().invocations)?;
                    out.flush()?;
                }
                other => {
                    return Err(std::io::Error::other(format!(
                        "unknown request {other:?} (this process is driven by loom-dev)"
                    )));
                }
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    // Shut down gracefully whatever ended the conversation: leases released, the roster left.
    rt.shutdown().await;
    Ok(served??)
}
