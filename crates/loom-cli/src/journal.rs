//! `loom journal …`: look at journals.

use futures::TryStreamExt;
use loom_core::{ActorId, Seq, SeqRange, Store, StoreError};

use crate::output::{Failure, dash, out, report, table};
use crate::source::Source;

pub fn parse_actor(s: &str) -> Result<ActorId, Failure> {
    s.parse()
        .map_err(|e| Failure(format!("bad actor id {s:?}: {e} (expected kind/key)")))
}

pub async fn all_actors(store: &dyn Store) -> Result<Vec<ActorId>, Failure> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = store.list_actors(after.as_ref(), 1000).await?;
        let Some(last) = page.last().cloned() else {
            break;
        };
        out.extend(page);
        after = Some(last);
    }
    Ok(out)
}

pub async fn ls(source: &Source, json: bool) -> Result<(), Failure> {
    let journals = source.journals().await?;
    if json {
        for (a, info) in journals {
            out(serde_json::json!({
                "actor": a.as_str(), "highest": info.highest, "trimmed_through": info.trimmed_through,
                "entries": info.len(), "snapshots": info.snapshots,
            }))?;
        }
        return Ok(());
    }
    let mut rows = Vec::with_capacity(journals.len());
    for (a, info) in journals {
        let snaps: Vec<String> = info.snapshots.iter().map(|s| s.to_string()).collect();
        rows.push(vec![
            a.to_string(),
            info.highest.to_string(),
            info.trimmed_through.to_string(),
            info.len().to_string(),
            dash(&snaps),
        ]);
    }
    table(
        &["ACTOR", "HIGHEST", "TRIMMED", "ENTRIES", "SNAPSHOTS"],
        rows,
        &[1, 2, 3],
    )
}

pub async fn show(source: &Source, actor: &str, from: Seq, to: Seq) -> Result<(), Failure> {
    let a = parse_actor(actor)?;
    let (info, _) = source.actor(&a).await?;
    if info.highest == 0 {
        return Err(Failure(format!("no journal for {a} in this store")));
    }
    source
        .entries(&a, from, to, |e| {
            out(serde_json::to_string(&e).map_err(|e| Failure(e.to_string()))?)
        })
        .await
}

pub async fn verify(
    opened: &loom_cli::store::Opened,
    actor: Option<&str>,
    json: bool,
) -> Result<(), Failure> {
    let store = &*opened.store;
    let actors = match actor {
        Some(a) => {
            let a = parse_actor(a)?;
            // As `show` and `stats` say: a misspelt actor is not a journal that verified.
            if store.info(&a).await?.highest == 0 {
                return Err(Failure(format!("no journal for {a} in this store")));
            }
            vec![a]
        }
        None => all_actors(store).await?,
    };
    // Each problem on a line of its own on stderr; with --json, in the one error object.
    let mut problems: Vec<String> = Vec::new();
    let mut problem = |line: String| {
        if !json {
            eprintln!("{line}");
        }
        problems.push(line);
    };
    let (mut checked, mut trimmed_meanwhile) = (0u64, 0u64);
    // Damage found, and journals an error kept from being checked (a store out of reach): the
    // exit code tells them apart.
    let (mut damaged, mut unchecked) = (0, 0);
    for a in &actors {
        match verify_one(store, a).await {
            Ok(v) => {
                checked += v.read;
                trimmed_meanwhile += v.trimmed_meanwhile;
            }
            // A gap left after the trim point was looked at again is a hole, not a trim under
            // the read: said so rather than in the store's words for a read cut short.
            Err(StoreError::Gap {
                expected, found, ..
            }) => {
                damaged += 1;
                problem(format!("{a}: {}", hole(expected, found)));
            }
            // A record of a format version past this build's was written by a newer one: not
            // damage this build can judge. (A version byte of 0, or one between, is damage.)
            Err(
                e @ StoreError::Corrupt {
                    source: loom_core::codec::CodecError::UnknownVersion { found },
                    ..
                },
            ) if found > loom_core::codec::FORMAT_ZSTD => {
                unchecked += 1;
                problem(format!(
                    "{a}: not checked: {e} (written by a newer build: check it with that build's loom)"
                ));
            }
            Err(e @ StoreError::Corrupt { .. }) => {
                damaged += 1;
                problem(format!("{a}: {e}"));
            }
            Err(e) => {
                unchecked += 1;
                problem(format!("{a}: not checked: {e}"));
            }
        }
    }
    // The partitions' outboxes and high-water marks (the relay's invariants).
    let mut relay = String::new();
    let mut relay_json = serde_json::Value::Null;
    let states = match (&opened.embedded, &opened.redis, &opened.postgres) {
        (Some(e), _, _) => e.outbox_states().await?,
        (None, Some(r), _) => r.outbox_states().await?,
        (None, None, Some(p)) => p.outbox_states().await?,
        (None, None, None) => Vec::new(),
    };
    let wrong = loom_core::store::backend::check_outboxes(&states);
    for w in &wrong {
        problem(w.clone());
    }
    if damaged + unchecked + wrong.len() > 0 {
        let mut said = Vec::new();
        if damaged > 0 {
            said.push(format!(
                "{damaged} of {} journals failed verification",
                actors.len()
            ));
        }
        if unchecked > 0 {
            said.push(format!(
                "{unchecked} of {} journals could not be checked",
                actors.len()
            ));
        }
        if !wrong.is_empty() {
            said.push(format!(
                "{} problems in the partitions' outboxes and high-water marks",
                wrong.len()
            ));
        }
        // Damage found is damage, whatever could not be checked besides; with none found, an
        // error that kept journals from being checked is a failure to check.
        if damaged > 0 || !wrong.is_empty() {
            loom_cli::output::found_damage();
        }
        return Err(listed(said.join("; "), &problems, json));
    }
    if !states.is_empty() {
        let waiting: u64 = states.iter().map(|s| s.pending).sum();
        relay_json = serde_json::json!({ "partitions": states.len(), "waiting_to_move": waiting });
        // PostgreSQL's relay keeps no marks (a move deletes what it enqueues).
        let what = if states.iter().any(|s| s.gapless) {
            "outboxes and high-water marks"
        } else {
            "outboxes"
        };
        relay = format!(
            "; {} partitions, {what} consistent, {waiting} messages waiting to move",
            states.len()
        );
    }
    // Entries a compaction trimmed before the read reached them were not read: said, so that
    // an ok of a busy store that read little is seen as such.
    let meanwhile = match trimmed_meanwhile {
        0 => String::new(),
        n => format!(" ({n} more trimmed meanwhile, by a compaction or a delete)"),
    };
    report(
        json,
        serde_json::json!({
            "ok": true, "journals": actors.len(), "entries": checked,
            "trimmed_meanwhile": trimmed_meanwhile, "relay": relay_json,
        }),
        format_args!(
            "ok: {} journals, {checked} entries verified{meanwhile}{relay}",
            actors.len()
        ),
    )
}

/// What a gap that no trim explains means: entries missing (`found` after `expected`), or an
/// entry out of order (a store giving back one it gave already).
fn hole(expected: Seq, found: Seq) -> String {
    match found.checked_sub(expected) {
        Some(1) => format!("entry {expected} is missing above the journal's trim point"),
        Some(n) if n > 1 => format!(
            "entries {expected} to {} are missing above the journal's trim point",
            found - 1
        ),
        _ => format!("entry {found} came where entry {expected} was expected: out of order"),
    }
}

/// `summary`, and with `--json` (where stderr holds one object) the problems themselves, the
/// first hundred of them.
fn listed(summary: String, problems: &[String], json: bool) -> Failure {
    if !json {
        return Failure(summary);
    }
    let shown: Vec<&str> = problems.iter().take(100).map(String::as_str).collect();
    let more = match problems.len().saturating_sub(shown.len()) {
        0 => String::new(),
        n => format!("; and {n} more"),
    };
    Failure(format!("{summary}: {}{more}", shown.join("; ")))
}

/// How often a journal that a store in use moved under its check is checked again.
const VERIFY_TRIES: u32 = 5;

/// Checks one journal: every entry from its trim point to its highest seq, in order and
/// readable, and every kept snapshot readable. A store in use moves under the check: entries
/// missing from the read because a compaction (or a delete) trimmed them since are not damage
/// (see [`verify_at`]); any other failure is reported only if the journal's trim point and
/// snapshots are the same at a new look, else it is checked again from that look (up to
/// [`VERIFY_TRIES`] times).
async fn verify_one(store: &dyn Store, a: &ActorId) -> Result<Verified, StoreError> {
    let mut tries = 0;
    loop {
        let info = store.info(a).await?;
        let failure = match verify_at(store, a, &info).await {
            Ok(n) => return Ok(n),
            Err(e) => e,
        };
        tries += 1;
        let now = store.info(a).await?;
        let moved = now.trimmed_through != info.trimmed_through || now.snapshots != info.snapshots;
        if !moved || tries >= VERIFY_TRIES {
            return Err(failure);
        }
    }
}

/// What [`verify_one`] checked of a journal.
#[derive(Default)]
struct Verified {
    /// Entries read and found in order.
    read: u64,
    /// Entries of the first look that a trim removed before the read reached them.
    trimmed_meanwhile: u64,
}

/// [`verify_one`] of the journal as `info` saw it: entries appended since are not read.
///
/// The read is [strict](SeqRange::strict), so a trim past the point it has reached stops it
/// rather than let it skip. Then the trim point is looked at again: if it has reached the
/// entry the read needed next, the entries the read did not see were removed by a trim since
/// (a compaction, whose snapshot stands for them, or a delete of the journal), not lost, and
/// the read goes on after the new trim point. Otherwise the journal has a hole, reported as
/// [`StoreError::Gap`]. The trim point only moves forward and the read ends at
/// `info.highest`, so this ends however busy the journal is; before, a check that only started
/// over failed on a journal compacted every few appends.
///
/// The snapshots of the first look are loaded, and after a trim under the read those of every
/// later look too, among which is the one a compaction wrote for the entries the read did not
/// see (a trim never passes the oldest kept snapshot), unless a later compaction dropped it
/// before it was loaded.
async fn verify_at(
    store: &dyn Store,
    a: &ActorId,
    info: &loom_core::JournalInfo,
) -> Result<Verified, StoreError> {
    let mut expect = info.trimmed_through + 1;
    let mut done = Verified::default();
    let mut snapshots: std::collections::BTreeSet<Seq> = info.snapshots.iter().copied().collect();
    while expect <= info.highest {
        let range = SeqRange::all().from(expect).to(info.highest).strict();
        let mut entries = store.read(a, range);
        let gap = loop {
            let found = match entries.try_next().await {
                Ok(Some(e)) if e.seq == expect => {
                    expect += 1;
                    done.read += 1;
                    continue;
                }
                Ok(Some(e)) => e.seq,
                Ok(None) => info.highest + 1,
                Err(e @ StoreError::Gap { .. }) => break e,
                Err(e) => return Err(e),
            };
            break StoreError::Gap {
                actor: a.clone(),
                expected: expect,
                found,
            };
        };
        if expect > info.highest {
            break;
        }
        let now = store.info(a).await?;
        if now.trimmed_through < expect {
            return Err(gap);
        }
        let next = (now.trimmed_through + 1).min(info.highest + 1);
        done.trimmed_meanwhile += next - expect;
        expect = next;
        snapshots.extend(now.snapshots.iter().copied());
    }
    // A snapshot replaced since loads an older one, or none: not damage. One failing its
    // checks is.
    for s in snapshots {
        store.load_snapshot(a, s).await?;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::hole;

    /// A gap no trim explains is named as missing entries; an entry a store gives back out of
    /// order (before it was expected) is said so, not counted backwards.
    #[test]
    fn a_hole_is_named_and_an_entry_out_of_order_counts_nothing_backwards() {
        assert_eq!(
            hole(3, 4),
            "entry 3 is missing above the journal's trim point"
        );
        assert_eq!(
            hole(3, 6),
            "entries 3 to 5 are missing above the journal's trim point"
        );
        for (expected, found) in [(7, 5), (7, 7)] {
            assert!(
                hole(expected, found).contains("out of order"),
                "{expected} {found}"
            );
        }
    }
}
