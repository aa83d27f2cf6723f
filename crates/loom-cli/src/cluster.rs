//! `loom cluster status`: the nodes sharing a store, the kinds each hosts, and for every kind
//! how much waits, whether a live node hosts it, and which nodes own its partitions.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use loom_core::partition::ownership_partitions;
use loom_core::store::{Lease, Roster};
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

/// The holder of each of `kind`'s partition leases now (`None`: no node owns it), by
/// partition.
async fn owners(store: &dyn Store, kind: &str) -> Result<Vec<Option<Lease>>, Failure> {
    let reads = (0..ownership_partitions(store.partitions()))
        .map(|p| async move { store.holder(&ActorId::partition_lease(kind, p)).await });
    let mut out = Vec::new();
    for r in futures::future::join_all(reads).await {
        out.push(r?);
    }
    Ok(out)
}

/// `host-a 11, host-b 21` (how many partitions each owner holds), and how many no one does.
fn owner_counts(owners: &[Option<Lease>]) -> (String, usize) {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for l in owners.iter().flatten() {
        *counts.entry(l.owner.as_str()).or_default() += 1;
    }
    let unowned = owners.iter().filter(|o| o.is_none()).count();
    let text: Vec<String> = counts.iter().map(|(n, c)| format!("{n} {c}")).collect();
    (text.join(", "), unowned)
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
    // Parked actors' messages are out of every backlog: counted beside it.
    let parked = loom_core::runtime::parked_per_kind(store).await?;
    kinds.extend(parked.keys().cloned());
    let mut rows = Vec::with_capacity(kinds.len());
    for kind in &kinds {
        let backlog = store.backlog(kind).await?;
        let hosts: Vec<String> = roster.hosts(kind).map(|m| m.node.clone()).collect();
        let owners = owners(store, kind).await?;
        rows.push((kind.clone(), hosts, backlog, owners));
    }
    let parked_of = |kind: &str| parked.get(kind).copied().unwrap_or(0);
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
            .map(|(kind, hosts, b, owners)| {
                let partitions: Vec<_> = owners
                    .iter()
                    .enumerate()
                    .map(|(p, l)| match l {
                        Some(l) => json!({
                            "partition": p,
                            "owner": l.owner,
                            "token": l.token,
                            "expires_at": l.expires_at.to_string(),
                        }),
                        None => json!({"partition": p, "owner": null}),
                    })
                    .collect();
                json!({
                    "kind": kind,
                    "hosts": hosts,
                    "waiting": b.mailboxes,
                    "ready": b.ready,
                    "parked": parked_of(kind),
                    "longest_wait_ms": b.longest_wait().as_millis() as u64,
                    "unowned": owner_counts(owners).1,
                    "partitions": partitions,
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
            "ownership_partitions": ownership_partitions(store.partitions()),
            "relay": relay,
            "scanned_all_mailboxes": !cut,
        }));
    }
    print_nodes(&roster)?;
    out("")?;
    let cells = rows
        .iter()
        .map(|(kind, hosts, b, owners)| {
            let (owned, unowned) = owner_counts(owners);
            let mut note = if hosts.is_empty() && b.mailboxes > 0 {
                "no live host: its messages wait".to_owned()
            } else if unowned > 0 && !hosts.is_empty() {
                format!("{unowned} partitions without an owner yet")
            } else {
                String::new()
            };
            if parked_of(kind) > 0 {
                let parks = "parked actors' messages wait for `loom parked unpark`";
                note = if note.is_empty() {
                    parks.to_owned()
                } else {
                    format!("{note}; {parks}")
                };
            }
            vec![
                kind.clone(),
                if hosts.is_empty() {
                    "-".to_owned()
                } else {
                    hosts.join(",")
                },
                if owned.is_empty() {
                    "-".to_owned()
                } else {
                    owned
                },
                b.mailboxes.to_string(),
                b.ready.to_string(),
                parked_of(kind).to_string(),
                if b.ready == 0 {
                    "-".to_owned()
                } else {
                    ago(b.longest_wait())
                },
                note,
            ]
        })
        .collect();
    table(
        &[
            "KIND",
            "HOSTS",
            "PARTITION OWNERS",
            "WAITING",
            "READY",
            "PARKED",
            "LONGEST WAIT",
            "",
        ],
        cells,
        &[3, 4, 5, 6],
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
        .filter(|(_, hosts, b, _)| hosts.is_empty() && b.mailboxes > 0)
        .count();
    out(format_args!(
        "{live} live node{}, {gone} gone; {orphaned} kind{} with waiting messages and no live host",
        if live == 1 { "" } else { "s" },
        if orphaned == 1 { "" } else { "s" },
    ))?;
    let partitions = store.partitions();
    let owned = ownership_partitions(partitions);
    if relay.is_empty() {
        out(format_args!(
            "each kind's actors are cut into {owned} partitions, each owned by one of the kind's live hosts; the store is not partitioned"
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
