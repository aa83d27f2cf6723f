//! `loom journal stats / compact / delete`, `loom deadletters ls / requeue / purge`.

use loom_core::runtime::{
    CompactError, JournalBytes, compact_journal, delete_journal, journal_bytes,
};
use loom_core::{ActorId, Store};
use serde::Serialize;

use crate::journal::{all_actors, parse_actor};
use crate::output::{Failure, dash, out, report, table};
use crate::source::Source;

#[derive(Serialize)]
struct Stats {
    actor: String,
    highest: u64,
    trimmed_through: u64,
    entries: u64,
    snapshots: Vec<u64>,
    pending_messages: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<JournalBytes>,
}

fn human(n: u64) -> String {
    match n {
        n if n >= 10 << 20 => format!("{} MiB", n >> 20),
        n if n >= 10 << 10 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

pub async fn stats(
    source: &Source,
    actor: Option<&str>,
    with_bytes: bool,
    json: bool,
) -> Result<(), Failure> {
    // Bytes are counted by reading every record: on the store itself only.
    let store = match with_bytes {
        true => Some(&*source.store("journal stats --bytes")?.store),
        false => None,
    };
    let journals = match actor {
        Some(a) => {
            let a = parse_actor(a)?;
            let (info, pending) = source.actor(&a).await?;
            if info.highest == 0 {
                return Err(Failure(format!("no journal for {a} in this store")));
            }
            vec![(a, info, pending)]
        }
        None => source.journals_with_pending().await?,
    };
    let mut rows = Vec::new();
    for (a, info, pending_messages) in journals {
        let bytes = match store {
            Some(s) => Some(journal_bytes(s, &a).await?),
            None => None,
        };
        rows.push(Stats {
            actor: a.to_string(),
            highest: info.highest,
            trimmed_through: info.trimmed_through,
            entries: info.len(),
            snapshots: info.snapshots,
            pending_messages,
            bytes,
        });
    }
    let total: u64 = rows.iter().map(|r| r.entries).sum();
    let pending: u64 = rows.iter().map(|r| r.pending_messages).sum();
    let all_bytes = rows
        .iter()
        .filter_map(|r| r.bytes)
        .fold(JournalBytes::default(), JournalBytes::sum);
    if json {
        for r in &rows {
            out(serde_json::to_string(r)?)?;
        }
        if actor.is_none() {
            let mut t = serde_json::json!({"journals": rows.len(), "entries": total, "pending_messages": pending});
            if with_bytes {
                t["bytes"] = serde_json::to_value(all_bytes)?;
            }
            out(t)?;
        }
        return Ok(());
    }
    let mut header = vec!["ACTOR", "HIGHEST", "TRIMMED", "ENTRIES", "PENDING"];
    if with_bytes {
        header.extend(["JSON", "ENCODED"]);
    }
    header.push("SNAPSHOTS");
    let cells = rows
        .iter()
        .map(|r| {
            let snaps: Vec<String> = r.snapshots.iter().map(u64::to_string).collect();
            let mut row = vec![
                r.actor.clone(),
                r.highest.to_string(),
                r.trimmed_through.to_string(),
                r.entries.to_string(),
                r.pending_messages.to_string(),
            ];
            if let Some(b) = r.bytes {
                row.extend([human(b.json), human(b.encoded)]);
            }
            row.push(dash(&snaps));
            row
        })
        .collect();
    let right: Vec<usize> = (1..header.len() - 1).collect();
    table(&header, cells, &right)?;
    if actor.is_none() {
        out(format_args!(
            "{} journals, {total} entries kept, {pending} messages waiting",
            rows.len()
        ))?;
    }
    if with_bytes && all_bytes.json > 0 {
        out(format_args!(
            "{} as JSON, {} as this build encodes them ({:.0}%), {} records compressed",
            human(all_bytes.json),
            human(all_bytes.encoded),
            all_bytes.encoded as f64 * 100.0 / all_bytes.json as f64,
            all_bytes.compressed_records
        ))?;
    }
    Ok(())
}

pub async fn compact(
    store: &dyn Store,
    actor: &str,
    keep: usize,
    json: bool,
) -> Result<(), Failure> {
    let a = parse_actor(actor)?;
    if store.info(&a).await?.highest == 0 {
        return Err(Failure(format!("no journal for {a} in this store")));
    }
    match compact_journal(store, &a, keep).await {
        Ok(c) => {
            if json {
                out(
                    serde_json::json!({"actor": a.as_str(), "snapshot": c.snapshot, "trimmed_through": c.trimmed_through}),
                )
            } else {
                out(format_args!(
                    "{a}: snapshot at {}, journal trimmed through {}",
                    c.snapshot, c.trimmed_through
                ))
            }
        }
        Err(CompactError::Nothing(_)) => report(
            json,
            serde_json::json!({"actor": a.as_str(), "snapshot": null, "nothing_to_compact": true}),
            format_args!("{a}: nothing to compact (no state change since the last snapshot)"),
        ),
        Err(e) => Err(Failure(e.to_string())),
    }
}

pub async fn delete(store: &dyn Store, actor: &str, yes: bool, json: bool) -> Result<(), Failure> {
    let a: ActorId = parse_actor(actor)?;
    let info = store.info(&a).await?;
    if info.highest == 0 {
        return Err(Failure(format!("no journal for {a} in this store")));
    }
    if !yes {
        return Err(Failure(format!(
            "this deletes the {} entries and {} snapshots of {a} for good; run again with --yes to do it",
            info.len(),
            info.snapshots.len()
        )));
    }
    let owner = format!("loom-cli-{}", std::process::id());
    match delete_journal(store, &a, &owner).await {
        Ok(()) => {}
        Err(loom_core::StoreError::LeaseHeld {
            owner,
            remaining_ms,
            ..
        }) => {
            return Err(Failure(format!(
                "{a} is held by {owner} (the node that owns its partition, or another tool), \
                 which may hold its state in memory; stop it there first (a lease left by a \
                 process that died runs out in {:.1} s)",
                remaining_ms as f64 / 1000.0
            )));
        }
        Err(loom_core::StoreError::LeaseLost { .. }) => {
            return Err(Failure(format!(
                "nothing of {a} was deleted: another tool holds it (a `loom mailbox bury` under \
                 way), or the store answered after this tool's hold on the partition ran out \
                 (a node may have taken it since); run it again"
            )));
        }
        Err(e) => return Err(e.into()),
    }
    report(
        json,
        serde_json::json!({
            "actor": a.as_str(), "deleted_entries": info.len(),
            "deleted_snapshots": info.snapshots.len(), "next_seq": info.highest + 1,
        }),
        format_args!(
            "{a}: journal and snapshots deleted (seqs up to {} stay used: the next append is {})",
            info.highest,
            info.highest + 1
        ),
    )
}

pub async fn dead_letters(
    source: &Source,
    after: Option<u64>,
    limit: usize,
    json: bool,
) -> Result<(), Failure> {
    let dead = source.dead_letters(after, limit).await?;
    if json {
        for d in &dead {
            out(serde_json::to_string(d)?)?;
        }
        return Ok(());
    }
    if dead.is_empty() {
        return out(match after {
            Some(a) => format!("no dead letters after {a}"),
            None => "no dead letters".to_owned(),
        });
    }
    let rows = dead
        .iter()
        .map(|d| {
            vec![
                d.id.to_string(),
                d.envelope.to.to_string(),
                d.deliveries.to_string(),
                d.at.to_string(),
                d.reason.replace('\n', " "),
            ]
        })
        .collect();
    table(
        &["ID", "ACTOR", "DELIVERIES", "AT", "REASON"],
        rows,
        &[0, 2],
    )?;
    if dead.len() == limit {
        out(format_args!(
            "(more: --after {})",
            dead.last().map_or(0, |d| d.id)
        ))?;
    }
    Ok(())
}

/// `--before`: an RFC 3339 time in UTC (`Z`), or an age counted back from now on this
/// machine's clock (`7d`, `36h`, `90s`).
fn parse_before(s: &str) -> Result<loom_core::Timestamp, Failure> {
    if let Ok(t) = humantime::parse_rfc3339(s) {
        let ms = t
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| Failure(format!("--before {s}: before 1970")))?
            .as_millis();
        return Ok(loom_core::Timestamp::from_millis(ms as u64));
    }
    match humantime::parse_duration(s) {
        Ok(age) => {
            let now = loom_core::Timestamp::now().as_millis();
            let age = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
            Ok(loom_core::Timestamp::from_millis(now.saturating_sub(age)))
        }
        Err(_) => Err(Failure(format!(
            "--before {s:?} is neither a UTC time (2026-11-30T00:00:00Z) nor an age (7d, 36h)"
        ))),
    }
}

pub async fn purge(
    source: &Source,
    before: Option<&str>,
    ids: &[u64],
    yes: bool,
    json: bool,
) -> Result<(), Failure> {
    let before = before.map(parse_before).transpose()?;
    if !yes {
        return Err(Failure(
            "purging deletes dead letters for good; add --yes to do it".into(),
        ));
    }
    let purged = source.purge(before, ids).await?;
    // A dead letter that does not decode makes listing fail on some stores: then the purge,
    // which is done, is reported, and what is left is said to be unknown, with why.
    let (left, unlisted) = match source.dead_letters(None, 1).await {
        Ok(d) => (Some(!d.is_empty()), None),
        Err(Failure(e)) => (None, Some(e)),
    };
    if json {
        return out(serde_json::json!({
            "purged": purged,
            "before": before.map(|b| b.to_string()),
            "any_left": left,
            "unlisted_because": unlisted,
        }));
    }
    if let Some(e) = unlisted {
        eprintln!("could not list what is left: {e}");
    }
    out(format_args!(
        "{purged} dead letters purged{}",
        before.map_or(String::new(), |b| format!(" (given up on before {b})"))
    ))
}

pub async fn requeue(source: &Source, id: u64, json: bool) -> Result<(), Failure> {
    let position = source.requeue(id).await?;
    report(
        json,
        serde_json::json!({ "requeued": id, "position": position }),
        format_args!("dead letter {id} is back in its mailbox at position {position}"),
    )
}

/// `loom redo salvage --store DIR [--yes]`: opens an embedded store whose redo log is damaged in
/// the middle, keeping the batches before the damage and moving the rest aside.
pub fn salvage_redo(dir: &std::path::Path, yes: bool, json: bool) -> Result<(), Failure> {
    use loom_core::{EmbeddedOptions, EmbeddedStore, StoreError};
    if !dir.join(loom_core::embedded::DATA_FILE).is_file() {
        return Err(Failure(format!(
            "{} holds no Loom store (no {})",
            dir.display(),
            loom_core::embedded::DATA_FILE
        )));
    }
    match EmbeddedStore::open(dir) {
        Ok(_) => {
            return report(
                json,
                serde_json::json!({ "salvaged": false, "intact": true }),
                format_args!(
                    "{}: the redo log is intact; nothing to salvage",
                    dir.display()
                ),
            );
        }
        // Only the refusals salvage mends say so (a damaged or missing log): another, an
        // emptied data file say, is not offered a salvage that would be refused the same.
        Err(e @ StoreError::Corrupt { .. }) if e.to_string().contains("loom redo salvage") => {
            if !yes {
                return Err(Failure(format!(
                    "{e}\nsalvaging opens the store without the batches the log held from the \
                     damage on (a damaged log's bytes are moved to {}/loom.redo.damaged-<ms>), \
                     or without a missing log; copy the directory first if it matters, then run \
                     again with --yes",
                    dir.display()
                )));
            }
        }
        Err(e) => return Err(e.into()),
    }
    let options = EmbeddedOptions {
        salvage_damaged_redo: true,
        ..EmbeddedOptions::default()
    };
    let damaged = || -> std::io::Result<Vec<String>> {
        Ok(std::fs::read_dir(dir)?
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".redo.damaged-"))
            .collect())
    };
    // Those this salvage keeps, not an earlier one's.
    let earlier = damaged()?;
    drop(EmbeddedStore::open_with(dir, options)?);
    let kept: Vec<String> = damaged()?
        .into_iter()
        .filter(|n| !earlier.contains(n))
        .collect();
    let without = if kept.is_empty() {
        "without what its missing redo log held".to_owned()
    } else {
        format!(
            "without the batches from the damage on (kept in {})",
            kept.join(", ")
        )
    };
    report(
        json,
        serde_json::json!({ "salvaged": true, "intact": false, "kept": kept }),
        format_args!("{}: salvaged; it opens again, {without}", dir.display()),
    )
}

/// `loom store repartition --store DIR --partitions N`: copies the store into a new one of `N`
/// partitions next to it, compares the two, then puts the copy in `DIR` and keeps the old one
/// beside it as `DIR.before-repartition-<ms>` (delete it once satisfied). Offline: the store's
/// lock keeps a running app out, and this command out of a running app's store. Killed at any
/// moment, it leaves `DIR` holding a whole store, and names that say what they hold: a
/// `DIR.repartition-<ms>` is a copy not yet compared (delete it), and a
/// `DIR.before-repartition-<ms>` holds the old store or, killed just before the swap, a copy
/// compared equal to it (see [`put_in_place`]).
pub async fn repartition(
    dir: &std::path::Path,
    partitions: u32,
    json: bool,
) -> Result<(), Failure> {
    use loom_core::EmbeddedStore;
    loom_core::partition::check_partitions(partitions)?;
    let source = EmbeddedStore::open_existing(dir)?;
    if source.partitions() == partitions {
        return report(
            json,
            serde_json::json!({ "partitions": partitions, "changed": false }),
            format_args!(
                "{} already has {partitions} partition(s); nothing to do",
                dir.display()
            ),
        );
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Failure(format!("{} names no directory", dir.display())))?;
    let stamp = loom_core::Timestamp::now().as_millis();
    let staging = dir.with_file_name(format!("{name}.repartition-{stamp}"));
    let backup = dir.with_file_name(format!("{name}.before-repartition-{stamp}"));
    let copied = source.copy_repartitioned(&staging, partitions).await?;
    let copy = EmbeddedStore::open(&staging)?;
    if let Err(e) = same_contents(&source, &copy).await {
        return Err(Failure(format!(
            "the copy in {} differs from the store ({e}); the store is left as it was",
            staging.display()
        )));
    }
    drop(copy);
    // While the old store is still open and locked.
    put_in_place(&staging, &backup, dir, &mut || {})?;
    drop(source);
    if json {
        out(serde_json::json!({
            "from": copied.from, "to": copied.to, "rows": copied.rows,
            "dead_letters": copied.dead_letters, "backup": backup.display().to_string(),
        }))
    } else {
        out(format_args!(
            "repartitioned {} from {} to {} partitions: {} rows and {} dead letters copied and compared; the old store is kept in {} (delete it once satisfied)",
            dir.display(),
            copied.from,
            copied.to,
            copied.rows,
            copied.dead_letters,
            backup.display()
        ))
    }
}

/// Puts the copy in `staging`, compared equal to the store in `dir`, in `dir`, and the store
/// that was there in `backup`; `step` runs after each change of names (a test's look at them).
///
/// The copy is first renamed to `backup`, then exchanged with `dir` in one atomic step. So at
/// every moment `dir` holds a whole store (the old, then the new), never nothing an app could
/// start on empty, and no name misleads whoever finds it after a kill: `staging` only ever
/// holds the copy, and `backup` the copy (compared equal) until the swap, the old store after.
/// Exchanging first and renaming after left the old store under `staging`'s name, that of a
/// copy, if the process was killed between the two.
fn put_in_place(
    staging: &std::path::Path,
    backup: &std::path::Path,
    dir: &std::path::Path,
    step: &mut dyn FnMut(),
) -> Result<(), Failure> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let sync = || std::fs::File::open(parent)?.sync_all();
    std::fs::rename(staging, backup).map_err(|e| {
        Failure(format!(
            "could not rename the copy {} to {} ({e}); the store is left as it was",
            staging.display(),
            backup.display()
        ))
    })?;
    step();
    exchange(backup, dir).map_err(|e| {
        // Named as a copy again, if it can be, since it is not the old store.
        let copy = match std::fs::rename(backup, staging) {
            Ok(()) => staging,
            Err(_) => backup,
        };
        Failure(format!(
            "could not swap {} into {} ({e}); the store is left as it was and the copy stays in {}",
            copy.display(),
            dir.display(),
            copy.display()
        ))
    })?;
    step();
    sync().map_err(|e| {
        Failure(format!(
            "{} now holds the copy and {} the old store, but the directory holding them could not be synced ({e}): a crash of the machine soon may undo the swap; run the command again if the store then has its old partition count",
            dir.display(),
            backup.display()
        ))
    })?;
    Ok(())
}

/// Swaps two paths atomically (`renameat2` with `RENAME_EXCHANGE`).
fn exchange(a: &std::path::Path, b: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &std::path::Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Compares what two stores hold, journal by journal and mailbox by mailbox.
async fn same_contents(a: &dyn Store, b: &dyn Store) -> Result<(), String> {
    let e = |e: loom_core::StoreError| e.to_string();
    let actors = all_actors(a).await.map_err(|f| f.0)?;
    if actors != all_actors(b).await.map_err(|f| f.0)? {
        return Err("the lists of journals differ".into());
    }
    for actor in &actors {
        let (x, y) = (
            a.info(actor).await.map_err(e)?,
            b.info(actor).await.map_err(e)?,
        );
        if (x.highest, x.trimmed_through, &x.snapshots)
            != (y.highest, y.trimmed_through, &y.snapshots)
        {
            return Err(format!("{actor}: {x:?} against {y:?}"));
        }
    }
    let mut after: Option<ActorId> = None;
    loop {
        let page = a.mailboxes(after.as_ref(), 1000).await.map_err(e)?;
        for m in &page {
            let (x, y) = (
                a.pending(m).await.map_err(e)?,
                b.pending(m).await.map_err(e)?,
            );
            if x != y {
                return Err(format!("the mailbox of {m}: {x} messages against {y}"));
            }
        }
        match page.last() {
            Some(last) => after = Some(last.clone()),
            None => break,
        }
    }
    let count_dead = async |s: &dyn Store| -> Result<usize, String> {
        let (mut n, mut after) = (0, None);
        loop {
            let page = s.dead_letters(after, 1000).await.map_err(e)?;
            n += page.len();
            match page.last() {
                Some(d) => after = Some(d.id),
                None => return Ok(n),
            }
        }
    };
    let (x, y) = (count_dead(a).await?, count_dead(b).await?);
    if x != y {
        return Err(format!("{x} dead letters against {y}"));
    }
    let (x, y) = (
        a.parked_actors(None, usize::MAX).await.map_err(e)?.len(),
        b.parked_actors(None, usize::MAX).await.map_err(e)?.len(),
    );
    if x != y {
        return Err(format!("{x} parked actors against {y}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a directory holds: the one line of its `what` file.
    fn what(dir: &std::path::Path) -> Option<String> {
        std::fs::read_to_string(dir.join("what")).ok()
    }

    #[test]
    fn a_repartition_killed_between_its_renames_leaves_no_name_that_misleads() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let staging = tmp.path().join("data.repartition-1");
        let backup = tmp.path().join("data.before-repartition-1");
        for (d, w) in [(&dir, "old"), (&staging, "copy")] {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join("what"), w).unwrap();
        }
        let mut steps = 0;
        // After every change of names, as a kill would leave them.
        put_in_place(&staging, &backup, &dir, &mut || {
            steps += 1;
            assert!(
                matches!(what(&dir).as_deref(), Some("old" | "copy")),
                "the store's directory holds a whole store"
            );
            assert_ne!(
                what(&staging).as_deref(),
                Some("old"),
                "the old store is under the copy's name"
            );
        })
        .unwrap();
        assert_eq!(steps, 2);
        assert_eq!(what(&dir).as_deref(), Some("copy"));
        assert_eq!(what(&backup).as_deref(), Some("old"));
        assert!(!staging.exists());
    }
}
