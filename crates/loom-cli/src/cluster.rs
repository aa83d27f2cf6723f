//! `loom cluster status`: the nodes sharing a store, the kinds each hosts, and for every kind
//! how much waits and whether a live node hosts it.

use std::collections::BTreeSet;
use std::time::Duration;

use loom_core::store::Roster;
use loom_core::{ActorId, Store, Timestamp};
use serde_json::json;

use loom_cli::output::{Failure, out, table};

/// At most this many mailboxes are scanned for kinds no node announces (a typo'd kind, or one
/// whose last host was forgotten); the kinds of nodes and `--kind` are always shown.
const SCAN: usize = 10_000;

/// `1.2 s`, `3 min`, `2 h`: how long, for people.
fn ago(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

/// The kinds of the first [`SCAN`] mailboxes (system mailboxes left out), and whether the scan
/// stopped before the end.
async fn kinds_waiting(store: &dyn Store) -> Result<(BTreeSet<String>, bool), Failure> {
    let mut kinds = BTreeSet::new();
    let mut after: Option<ActorId> = None;
    let mut seen = 0;
    loop {
        let page = store.mailboxes(after.as_ref(), 1000).await?;
        seen += page.len();
        for a in &page {
            if !a.is_system() {
                kinds.insert(a.kind().to_owned());
            }
        }
        match page.last() {
            Some(last) if page.len() == 1000 => {
                if seen >= SCAN {
                    return Ok((kinds, true));
                }
                after = Some(last.clone());
            }
            _ => return Ok((kinds, false)),
        }
    }
}

/// `loom cluster status [--kind K]...`.
pub async fn status(store: &dyn Store, extra: &[String], json: bool) -> Result<(), Failure> {
    let roster: Roster = store.members().await?;
    let mut kinds: BTreeSet<String> = roster
        .members
        .iter()
        .flat_map(|m| m.kinds.iter().cloned())
        .collect();
    for k in extra {
        // Checked as an actor id would be: a bad kind is a typo to report, not a row.
        ActorId::new(k, "x").map_err(|e| Failure(format!("--kind {k:?}: {e}")))?;
        kinds.insert(k.clone());
    }
    let (waiting, cut) = kinds_waiting(store).await?;
    kinds.extend(waiting);
    let mut rows = Vec::with_capacity(kinds.len());
    for kind in &kinds {
        let backlog = store.backlog(kind).await?;
        let hosts: Vec<String> = roster.hosts(kind).map(|m| m.node.clone()).collect();
        rows.push((kind.clone(), hosts, backlog));
    }
    let relay = store.relay_backlog().await?;
    let at = roster.at;
    if json {
        let nodes: Vec<_> = roster
            .members
            .iter()
            .map(|m| {
                json!({
                    "node": m.node,
                    "incarnation": format!("{:016x}", m.incarnation),
                    "live": m.is_live(at),
                    "kinds": m.kinds,
                    "joined_at": m.joined_at.to_string(),
                    "beat_at": m.beat_at.to_string(),
                    "expires_at": m.expires_at().to_string(),
                })
            })
            .collect();
        let kinds: Vec<_> = rows
            .iter()
            .map(|(kind, hosts, b)| {
                json!({
                    "kind": kind,
                    "hosts": hosts,
                    "waiting": b.mailboxes,
                    "ready": b.ready,
                    "longest_wait_ms": b.longest_wait().as_millis() as u64,
                })
            })
            .collect();
        let relay: Vec<_> = relay
            .iter()
            .map(|r| json!({"partition": r.partition, "waiting": r.waiting}))
            .collect();
        return out(json!({
            "at": at.to_string(),
            "nodes": nodes,
            "kinds": kinds,
            "partitions": store.partitions(),
            "relay": relay,
            "scanned_all_mailboxes": !cut,
        }));
    }
    print_nodes(&roster)?;
    out("")?;
    let cells = rows
        .iter()
        .map(|(kind, hosts, b)| {
            let note = if hosts.is_empty() && b.mailboxes > 0 {
                "no live host: its messages wait"
            } else {
                ""
            };
            vec![
                kind.clone(),
                if hosts.is_empty() {
                    "-".to_owned()
                } else {
                    hosts.join(",")
                },
                b.mailboxes.to_string(),
                b.ready.to_string(),
                if b.ready == 0 {
                    "-".to_owned()
                } else {
                    ago(b.longest_wait())
                },
                note.to_owned(),
            ]
        })
        .collect();
    table(
        &["KIND", "HOSTS", "WAITING", "READY", "LONGEST WAIT", ""],
        cells,
        &[2, 3, 4],
    )?;
    if cut {
        out(format_args!(
            "(kinds found in the first {SCAN} mailboxes; name others with --kind)"
        ))?;
    }
    out("")?;
    let live = roster.live().count();
    let gone = roster.members.len() - live;
    let orphaned = rows
        .iter()
        .filter(|(_, hosts, b)| hosts.is_empty() && b.mailboxes > 0)
        .count();
    out(format_args!(
        "{live} live node{}, {gone} gone; {orphaned} kind{} with waiting messages and no live host",
        if live == 1 { "" } else { "s" },
        if orphaned == 1 { "" } else { "s" },
    ))?;
    let partitions = store.partitions();
    if relay.is_empty() {
        out(format_args!(
            "{partitions} partition; actors are leased one by one by the nodes that host their kind"
        ))
    } else {
        let behind: Vec<String> = relay
            .iter()
            .map(|r| format!("p{} {}", r.partition, r.waiting))
            .collect();
        out(format_args!(
            "{partitions} partitions; relay backlog: {}",
            behind.join(", ")
        ))
    }
}

fn print_nodes(roster: &Roster) -> Result<(), Failure> {
    let at: Timestamp = roster.at;
    let cells = roster
        .members
        .iter()
        .map(|m| {
            let state = if m.is_live(at) { "live" } else { "gone" };
            vec![
                m.node.clone(),
                state.to_owned(),
                if m.kinds.is_empty() {
                    "(client)".to_owned()
                } else {
                    m.kinds.join(",")
                },
                m.joined_at.to_string(),
                format!("{} ago", ago(at.saturating_since(m.beat_at))),
            ]
        })
        .collect();
    table(
        &["NODE", "STATE", "KINDS", "JOINED", "LAST BEAT"],
        cells,
        &[],
    )
}
