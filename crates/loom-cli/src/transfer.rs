//! `loom export`, `loom import`, `loom migrate`: moving journals, snapshots and waiting messages
//! between stores.
//!
//! ## The export format (version 2)
//!
//! UTF-8 text, one JSON object per line:
//!
//! ```text
//! {"loom_export":2}
//! {"journal":{"actor":"acct/alice","highest":120,"trimmed_through":100,"snapshots":2}}
//! {"entry":{"actor":"acct/alice","entry":{"seq":101,"at":…,"kind":{…}}}}     (seqs trimmed_through+1 ..= highest, in order)
//! {"snapshot":{"actor":"acct/alice","snapshot":{"seq":100,…}}}              (oldest first)
//! … more journals …
//! {"message":{"envelope":{…},"deliver_at":1700000000000}}                   (deliver_at null if due;
//!                                                                          "cancelling":true if its
//!                                                                          invocation is to be cancelled)
//! {"end":{"journals":…,"entries":…,"snapshots":…,"messages":…,"crc32":…}}
//! ```
//!
//! Version 1 is the same, but files of older builds lack some fields: `cancelling` and an
//! envelope's `retire` (and, before 2026-11-30, `requeued_from`); this build imports
//! both, and a build that reads only version 1 refuses a version-2 file instead of dropping
//! them. `crc32` is the CRC-32 (IEEE) of every byte before the `end` line. `loom import` checks the
//! whole file (version, order, numbering, counts, checksum) and that the target holds none of
//! its journals and no message in the mailboxes it writes to before it writes anything, so a
//! damaged or truncated file is refused whole. Dead letters and parks are not exported: requeue
//! the dead letters first, or inspect them in the source; a parked actor's messages run on the
//! target (`loom migrate` copies parks). Both copy from and into stores at rest: stop the
//! runtimes using them first (both refuse a Redis or PostgreSQL source or target that lists
//! live nodes, [`at_rest`]), and the source's relay moves what waits between partitions before
//! the copy reads mailboxes. An actor whose journal starts at a trim point is parked while its
//! journal is written ([`hold_for_copy`]), so that a copy cut short leaves none to recover from
//! its default state.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

use futures::TryStreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use loom_core::limits::MAX_BATCH_BYTES;
use loom_core::store::backend::{encode_entry, prepare_message, prepare_snapshot};
use loom_core::{ActorId, Entry, Envelope, Seq, SeqRange, Snapshot, Store, Timestamp, Waiting};
use serde::{Deserialize, Serialize};

use crate::journal::all_actors;
use crate::output::{Failure, out, report};

/// The export format version this build writes. 2: a message may be `cancelling`, and an
/// envelope may `retire` its actor, fields an import of version 1 would drop without a word
/// (it decodes what it knows and writes that), so it refuses a version-2 file whole instead.
pub const EXPORT_VERSION: u32 = 2;

/// The oldest export format version this build reads (version 1 lacks nothing version 2
/// needs: the fields it adds are absent when unset).
pub const OLDEST_EXPORT_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    LoomExport(u32),
    Journal {
        actor: ActorId,
        highest: Seq,
        trimmed_through: Seq,
        snapshots: usize,
    },
    Entry {
        actor: ActorId,
        entry: Entry,
    },
    Snapshot {
        actor: ActorId,
        snapshot: Snapshot,
    },
    Message {
        envelope: Envelope,
        deliver_at: Option<Timestamp>,
        /// Its invocation was asked to be cancelled (`Mailbox::cancel`); absent when not.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        cancelling: bool,
    },
    End(Counts),
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Counts {
    journals: u64,
    entries: u64,
    snapshots: u64,
    messages: u64,
    #[serde(default)]
    crc32: u32,
}

const PAGE: usize = 1000;

fn bar(len: u64, what: &'static str) -> Result<ProgressBar, Failure> {
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} journals")?
            .progress_chars("=> "),
    );
    b.set_message(what);
    Ok(b)
}

/// Passes every waiting message of every mailbox in `store` to `f`, in mailbox order and each
/// mailbox's in order, reading a page at a time: a backlog of millions is never held in memory
/// (it was, whole, before an export or a migration wrote its first message).
async fn each_message(
    store: &dyn Store,
    mut f: impl AsyncFnMut(Waiting) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let mut after = None;
    loop {
        let boxes = store.mailboxes(after.as_ref(), 1000).await?;
        let Some(last) = boxes.last().cloned() else {
            break;
        };
        for b in &boxes {
            let mut pos = None;
            loop {
                let page = store.messages(b, pos, PAGE).await?;
                let Some(l) = page.last() else { break };
                pos = Some(l.position);
                for w in page {
                    f(w).await?;
                }
            }
        }
        after = Some(last);
    }
    Ok(())
}

/// Every mailbox in `store` that holds waiting messages, in id order.
async fn all_mailboxes(store: &dyn Store) -> Result<Vec<ActorId>, Failure> {
    let mut out: Vec<ActorId> = Vec::new();
    loop {
        let page = store.mailboxes(out.last(), 1000).await?;
        if page.is_empty() {
            return Ok(out);
        }
        out.extend(page);
    }
}

/// Enqueues a copied message in `target`, with its cancellation's mark if it had one.
async fn copy_message(
    target: &dyn Store,
    envelope: &Envelope,
    deliver_at: Option<Timestamp>,
    cancelling: bool,
) -> Result<(), Failure> {
    target.enqueue(envelope, deliver_at).await?;
    if cancelling && target.cancel(&envelope.to, envelope.id).await?.is_none() {
        return Err(Failure(format!(
            "message {} to {} vanished from the target as it was copied; is a runtime using it?",
            envelope.id, envelope.to
        )));
    }
    Ok(())
}

/// Waits until the store's relay (this process's, which opening a store of several partitions
/// starts) has moved every message out of the outboxes: a message still in an outbox is in no
/// mailbox yet, and a copy reads the mailboxes.
async fn drain_outboxes(store: &dyn Store) -> Result<(), Failure> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let waiting: u64 = store.relay_backlog().await?.iter().map(|b| b.waiting).sum();
        if waiting == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            let why = store
                .relay_failure()
                .map(|f| format!(" (its relay fails: {})", f.latest))
                .unwrap_or_default();
            return Err(Failure(format!(
                "{waiting} messages are still in the source's outboxes, on their way between partitions, after a minute{why}: the copy reads the mailboxes, so it needs a store at rest; stop the runtimes using it first; nothing was written"
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Refuses a copy from or into a store that nodes (or client runtimes) still use. From: the
/// copy reads each journal and then the mailboxes, so a message handled in between would be
/// copied and run again on the target, and an actor first written meanwhile would be left out,
/// while the copy still verified. Into: a node would run an actor whose journal is copied in
/// part (its snapshots come after its entries), or whose park is not copied yet, and take the
/// messages the copy then counts. An embedded store needs no look: opening its directory
/// proves that no process runs it (whose membership records may not have run out yet, after a
/// crash).
pub async fn at_rest(source: &loom_cli::store::Opened, what: &str) -> Result<(), Failure> {
    if source.embedded.is_some() {
        return Ok(());
    }
    let roster = source.store.members().await?;
    let live: Vec<&str> = roster.live().map(|m| m.node.as_str()).collect();
    if live.is_empty() {
        return Ok(());
    }
    Err(Failure(format!(
        "{what} copies from and into stores at rest, and {} live node(s) use this one ({}): stop them first \
         (`loom cluster status` lists them; a node killed without a shutdown is listed until its \
         heartbeat runs out); nothing was written",
        live.len(),
        live.join(", ")
    )))
}

pub async fn export(store: &dyn Store, path: &Path, json: bool) -> Result<(), Failure> {
    if path.exists() {
        return Err(Failure(format!(
            "{} exists; export writes a new file",
            path.display()
        )));
    }
    drain_outboxes(store).await?;
    // Written beside the export under a name of its own (a file already there is never
    // truncated: `create_new`), renamed into place once complete, removed if the export fails.
    let Some(name) = path.file_name() else {
        return Err(Failure(format!("{} names no file", path.display())));
    };
    let mut name = name.to_os_string();
    name.push(format!(".{}.partial", std::process::id()));
    let tmp = path.with_file_name(name);
    let file = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| Failure(format!("cannot create {}: {e}", tmp.display())))?;
    let end = match write_export(store, file).await {
        Ok(end) => end,
        Err(Failure(e)) => return Err(discard(&tmp, e)),
    };
    // Read back as `import` will: a journal the store holds damaged (a hole, an entry or a
    // snapshot a store would refuse) is found now, while the store can still be looked at,
    // not when the file is imported after the store is gone.
    let checked = std::fs::File::open(&tmp)
        .map_err(|e| Failure(format!("cannot read {} back: {e}", tmp.display())))
        .and_then(|mut f| {
            check(
                &mut f,
                path,
                "the store holds what an import would refuse (see `loom journal verify`), so the export was not kept",
            )
        });
    if let Err(Failure(e)) = checked {
        return Err(discard(&tmp, e));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let e = format!("cannot move the export into {}: {e}", path.display());
        return Err(discard(&tmp, e));
    }
    report(
        json,
        serde_json::json!({
            "exported": path.display().to_string(), "journals": end.journals,
            "entries": end.entries, "snapshots": end.snapshots, "messages": end.messages,
        }),
        format_args!(
            "exported {} journals, {} entries, {} snapshots, {} messages to {}",
            end.journals,
            end.entries,
            end.snapshots,
            end.messages,
            path.display()
        ),
    )
}

/// The failure `e` of an export, its temp file `tmp` removed (or the failure says it is left).
fn discard(tmp: &Path, e: String) -> Failure {
    Failure(match std::fs::remove_file(tmp) {
        Ok(()) => e,
        Err(left) => format!("{e}; and {} could not be removed: {left}", tmp.display()),
    })
}

/// Writes the export of `store` to `file`, synced; returns its counts and checksum.
async fn write_export(store: &dyn Store, file: std::fs::File) -> Result<Counts, Failure> {
    let mut w = BufWriter::new(file);
    let mut crc = crc32fast::Hasher::new();
    let mut counts = Counts::default();
    let mut line = |w: &mut BufWriter<std::fs::File>, l: &Line| -> Result<(), Failure> {
        let mut bytes = serde_json::to_vec(l)?;
        bytes.push(b'\n');
        crc.update(&bytes);
        w.write_all(&bytes)?;
        Ok(())
    };
    line(&mut w, &Line::LoomExport(EXPORT_VERSION))?;
    let actors = all_actors(store).await?;
    let progress = bar(actors.len() as u64, "exported")?;
    for a in &actors {
        let info = store.info(a).await?;
        line(
            &mut w,
            &Line::Journal {
                actor: a.clone(),
                highest: info.highest,
                trimmed_through: info.trimmed_through,
                snapshots: info.snapshots.len(),
            },
        )?;
        let mut entries = store.read(a, SeqRange::all());
        while let Some(e) = entries.try_next().await? {
            line(
                &mut w,
                &Line::Entry {
                    actor: a.clone(),
                    entry: e,
                },
            )?;
            counts.entries += 1;
        }
        for &seq in &info.snapshots {
            let snapshot = store.load_snapshot(a, seq).await?.ok_or_else(|| {
                Failure(format!("snapshot {seq} of {a} vanished during the export"))
            })?;
            line(
                &mut w,
                &Line::Snapshot {
                    actor: a.clone(),
                    snapshot,
                },
            )?;
            counts.snapshots += 1;
        }
        counts.journals += 1;
        progress.inc(1);
    }
    each_message(store, async |m: Waiting| {
        line(
            &mut w,
            &Line::Message {
                envelope: m.envelope,
                deliver_at: m.deliver_at,
                cancelling: m.cancelling,
            },
        )?;
        counts.messages += 1;
        Ok(())
    })
    .await?;
    progress.finish_and_clear();
    let end = Counts {
        crc32: crc.finalize(),
        ..counts
    };
    let mut bytes = serde_json::to_vec(&Line::End(end))?;
    bytes.push(b'\n');
    w.write_all(&bytes)?;
    w.flush()?;
    w.get_ref().sync_all()?;
    Ok(end)
}

/// Checks an export file whole: returns its counts and the journals it holds.
/// An export file [`check`]ed whole, for [`import`]: what it holds, and the file to read it
/// from again.
pub struct Checked {
    path: std::path::PathBuf,
    file: std::fs::File,
    counts: Counts,
    journals: Vec<ActorId>,
    recipients: BTreeSet<ActorId>,
}

impl Checked {
    /// Opens and checks the export at `path`, before any store is opened: a file refused here
    /// leaves no target created.
    pub fn file(path: &Path) -> Result<Checked, Failure> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| Failure(format!("cannot open {}: {e}", path.display())))?;
        let (counts, journals, recipients) = check(&mut file, path, "nothing was imported")?;
        Ok(Checked {
            path: path.to_owned(),
            file,
            counts,
            journals,
            recipients,
        })
    }
}

/// Checks the export `file` (named `path` in what it says) whole, as an import must find it:
/// its counts and checksum, the order of its records, and each record as a store would take
/// it. A refusal names the line, what is wrong, and `then` (what was done about it).
fn check(
    file: &mut std::fs::File,
    path: &Path,
    then: &str,
) -> Result<(Counts, Vec<ActorId>, BTreeSet<ActorId>), Failure> {
    let bad =
        |n: usize, what: String| Failure(format!("{} line {n}: {what}; {then}", path.display()));
    let mut crc = crc32fast::Hasher::new();
    let mut counts = Counts::default();
    let mut journals = Vec::new();
    let mut recipients = BTreeSet::new();
    // The journal being read: actor, next seq expected, last seq, snapshots still expected,
    // and the lowest seq its next snapshot may have (its trim point, then one past the last).
    let mut current: Option<(ActorId, Seq, Seq, usize, Seq)> = None;
    let mut named = BTreeSet::new();
    let mut ended = None;
    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    let mut n = 0;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        n += 1;
        if ended.is_some() {
            return Err(bad(n, "text after the end record".into()));
        }
        if buf.last() != Some(&b'\n') {
            return Err(bad(n, "the file is cut off".into()));
        }
        let l: Line = serde_json::from_slice(&buf)
            .map_err(|e| bad(n, format!("not an export record ({e})")))?;
        let finish_journal =
            |cur: &mut Option<(ActorId, Seq, Seq, usize, Seq)>| -> Result<(), Failure> {
                if let Some((a, next, highest, snaps, _)) = cur.take() {
                    if next != highest + 1 {
                        return Err(bad(
                            n,
                            format!(
                                "{a} ends at entry {} but its highest is {highest}",
                                next - 1
                            ),
                        ));
                    }
                    if snaps != 0 {
                        return Err(bad(n, format!("{a} is missing {snaps} snapshots")));
                    }
                }
                Ok(())
            };
        // What a store would refuse (too large, say) is refused here, before anything is
        // written, as the rest of this check is.
        let refused = match &l {
            Line::Entry { actor, entry } => encode_entry(actor, entry).err(),
            Line::Snapshot { actor, snapshot } => prepare_snapshot(actor, snapshot, 1).err(),
            Line::Message { envelope, .. } => prepare_message(envelope).err(),
            _ => None,
        };
        if let Some(e) = refused {
            return Err(bad(n, e.to_string()));
        }
        match l {
            Line::LoomExport(v) if n == 1 => {
                if !(OLDEST_EXPORT_VERSION..=EXPORT_VERSION).contains(&v) {
                    return Err(bad(
                        n,
                        format!(
                            "export version {v}; this build reads versions {OLDEST_EXPORT_VERSION} to {EXPORT_VERSION}"
                        ),
                    ));
                }
            }
            _ if n == 1 => return Err(bad(n, "not a Loom export (no header)".into())),
            Line::LoomExport(_) => return Err(bad(n, "a second header".into())),
            Line::Journal {
                actor,
                highest,
                trimmed_through,
                snapshots,
            } => {
                finish_journal(&mut current)?;
                if trimmed_through > highest {
                    return Err(bad(n, format!("{actor} is trimmed past its highest seq")));
                }
                if !named.insert(actor.clone()) {
                    return Err(bad(n, format!("a second journal of {actor}")));
                }
                journals.push(actor.clone());
                counts.journals += 1;
                // A snapshot below the trim point, or at seq 0, is one the store refuses.
                let lowest = trimmed_through.max(1);
                current = Some((actor, trimmed_through + 1, highest, snapshots, lowest));
            }
            Line::Entry { actor, entry } => match &mut current {
                Some((a, next, _, _, _)) if *a == actor && entry.seq == *next => {
                    *next += 1;
                    counts.entries += 1;
                }
                _ => {
                    return Err(bad(
                        n,
                        format!("entry {} of {actor} is out of place", entry.seq),
                    ));
                }
            },
            Line::Snapshot { actor, snapshot } => match &mut current {
                Some((a, next, _, snaps, lowest))
                    if *a == actor && *snaps > 0 && (*lowest..*next).contains(&snapshot.seq) =>
                {
                    *snaps -= 1;
                    *lowest = snapshot.seq + 1;
                    counts.snapshots += 1;
                }
                _ => {
                    return Err(bad(
                        n,
                        format!("snapshot {} of {actor} is out of place", snapshot.seq),
                    ));
                }
            },
            Line::Message { envelope, .. } => {
                finish_journal(&mut current)?;
                counts.messages += 1;
                recipients.insert(envelope.to);
            }
            Line::End(end) => {
                finish_journal(&mut current)?;
                let computed = Counts {
                    crc32: crc.clone().finalize(),
                    ..counts
                };
                if end != computed {
                    return Err(bad(
                        n,
                        format!("the end record says {end:?}, the file holds {computed:?}"),
                    ));
                }
                ended = Some(end);
            }
        }
        if ended.is_none() {
            crc.update(&buf);
        }
    }
    let end = ended.ok_or_else(|| bad(n + 1, "no end record: the file is cut off".into()))?;
    Ok((end, journals, recipients))
}

/// Refuses, before anything is written, messages waiting in event lanes named for a store of
/// one partition when the target has several: lanes are named differently in the two
/// ([`ActorId::renamed_for`]), and such a lane's name does not carry what the new one needs, so
/// the event's wait on the target would never find it. (Lanes named for several are renamed
/// for a target of one as they are copied.)
fn check_lanes<'a>(
    recipients: impl IntoIterator<Item = &'a ActorId>,
    target: &dyn Store,
) -> Result<(), Failure> {
    let partitions = target.partitions();
    let stuck: BTreeSet<&ActorId> = recipients
        .into_iter()
        .filter(|to| to.renamed_for(partitions).is_none())
        .collect();
    match stuck.first() {
        None => Ok(()),
        Some(first) => Err(Failure(format!(
            "{} event lanes (such as {first}) hold waiting events named for a store of one \
             partition, and the target has {partitions}: lanes are named differently there, and \
             these cannot be renamed, so their waits would never find them. Let the waiting \
             events be received first (`loom mailbox show {first}` shows a lane's; `loom \
             mailbox ls` leaves lanes out), or copy into a store of one partition; nothing was \
             written",
            stuck.len()
        ))),
    }
}

/// `envelope` addressed as the target store names its recipient (an event lane is named
/// differently in a store of one partition and in one of several); [`check_lanes`] passed.
fn renamed(mut envelope: Envelope, target: &dyn Store) -> Result<Envelope, Failure> {
    envelope.to = envelope
        .to
        .renamed_for(target.partitions())
        .ok_or_else(|| {
            Failure(format!(
                "{} cannot be renamed for the target's partitions",
                envelope.to
            ))
        })?;
    Ok(envelope)
}

/// Refuses a target that already holds any of `journals`, or a waiting message in any of the
/// mailboxes of `recipients` (as the target names them): a copy would add to them, and a second
/// copy of the same messages would deliver them twice.
async fn target_is_free<'a>(
    target: &dyn Store,
    journals: &[ActorId],
    recipients: impl IntoIterator<Item = &'a ActorId>,
) -> Result<(), Failure> {
    for a in journals {
        let h = target.highest_seq(a).await?;
        if h != 0 {
            return Err(Failure(format!(
                "the target store already has a journal for {a} (highest seq {h}); import and migrate write into stores that do not (an earlier copy cut short leaves one: start again into an empty store); nothing was written"
            )));
        }
    }
    let partitions = target.partitions();
    let boxes: BTreeSet<ActorId> = recipients
        .into_iter()
        .filter_map(|to| to.renamed_for(partitions))
        .collect();
    for a in &boxes {
        let n = target.pending(a).await?;
        if n != 0 {
            return Err(Failure(format!(
                "the target store already has {n} messages waiting for {a}; import and migrate write into mailboxes that hold none (an earlier copy cut short leaves some: start again into an empty store); nothing was written"
            )));
        }
    }
    Ok(())
}

/// Imports the export at `path` into `target`: checks the whole file first ([`check`]) and
/// writes nothing if it is damaged, then reads it again, through the same open file (a file
/// replaced under its name meanwhile is not read), and writes it. A file changed in place
/// between the two reads (written on by another process) is found by the end record's CRC in
/// the second read too, and the import fails, saying what it wrote.
/// `into` names the target in the report (`--store` defaults to `./loom-data`: an import
/// whose store setting was lost says where it wrote).
pub async fn import(
    target: &dyn Store,
    into: &str,
    checked: Checked,
    json: bool,
) -> Result<(), Failure> {
    let Checked {
        path,
        mut file,
        counts,
        journals,
        recipients,
    } = checked;
    let path = path.as_path();
    check_lanes(&recipients, target)?;
    target_is_free(target, &journals, &recipients).await?;
    let progress = bar(counts.journals, "imported")?;
    file.seek(SeekFrom::Start(0))?;
    write_checked(target, BufReader::new(file), &counts, path, &progress).await?;
    progress.finish_and_clear();
    report(
        json,
        serde_json::json!({
            "imported": path.display().to_string(), "into": into, "journals": counts.journals,
            "entries": counts.entries, "snapshots": counts.snapshots, "messages": counts.messages,
        }),
        format_args!(
            "imported {} journals, {} entries, {} snapshots, {} messages from {} into {into}",
            counts.journals,
            counts.entries,
            counts.snapshots,
            counts.messages,
            path.display()
        ),
    )
}

/// The write pass of [`import`]: writes the export `reader` reads into `target`, which
/// [`check`] found whole with `counts`; fails if what it reads now is not what was checked
/// (its CRC, or its end record missing).
async fn write_checked(
    target: &dyn Store,
    mut reader: impl BufRead,
    counts: &Counts,
    path: &Path,
    progress: &ProgressBar,
) -> Result<(), Failure> {
    let changed = |what: &str| {
        Failure(format!(
            "{} changed after it was checked ({what}); the target holds part of it: start again \
             into an empty store from a file nothing writes to",
            path.display()
        ))
    };
    let mut crc = crc32fast::Hasher::new();
    let mut ended = false;
    let mut batch = Batch::default();
    let mut snapshots: Vec<Snapshot> = Vec::new();
    let mut current: Option<(ActorId, bool)> = None;
    async fn flush_journal(
        target: &dyn Store,
        (actor, held): &(ActorId, bool),
        batch: &mut Batch,
        snapshots: &mut Vec<Snapshot>,
    ) -> Result<(), Failure> {
        batch.flush(target, actor).await?;
        let keep = snapshots.len().max(1);
        for s in snapshots.drain(..) {
            target.save_snapshot(actor, &s, keep).await?;
        }
        // An export holds no parks.
        release_after_copy(target, actor, *held, None).await
    }
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        if ended {
            return Err(changed("text after the end record"));
        }
        let l: Line =
            serde_json::from_slice(&buf).map_err(|e| changed(&format!("a record: {e}")))?;
        if !matches!(l, Line::End(_)) {
            crc.update(&buf);
        }
        match l {
            Line::Journal {
                actor,
                trimmed_through,
                ..
            } => {
                if let Some(a) = current.take() {
                    flush_journal(target, &a, &mut batch, &mut snapshots).await?;
                    progress.inc(1);
                }
                let held = hold_for_copy(target, &actor, trimmed_through).await?;
                target.begin_at(&actor, trimmed_through).await?;
                current = Some((actor, held));
            }
            Line::Entry { actor, entry } => {
                batch.add(target, &actor, entry).await?;
            }
            Line::Snapshot { snapshot, .. } => snapshots.push(snapshot),
            Line::Message {
                envelope,
                deliver_at,
                cancelling,
            } => {
                if let Some(a) = current.take() {
                    flush_journal(target, &a, &mut batch, &mut snapshots).await?;
                    progress.inc(1);
                }
                let envelope = renamed(envelope, target)?;
                copy_message(target, &envelope, deliver_at, cancelling).await?;
            }
            Line::End(_) => {
                if crc.clone().finalize() != counts.crc32 {
                    return Err(changed("its records no longer match their CRC"));
                }
                if let Some(a) = current.take() {
                    flush_journal(target, &a, &mut batch, &mut snapshots).await?;
                    progress.inc(1);
                }
                ended = true;
            }
            Line::LoomExport(_) => {}
        }
    }
    if !ended {
        return Err(changed("it ends before its end record"));
    }
    Ok(())
}

/// Why a copy parks an actor whose journal starts at a trim point while it writes it. Its
/// snapshots are written after its entries (an export holds them so), and a journal with a
/// trim point and no snapshot is how a deleted journal looks, which recovers from the default
/// state: a copy cut short in between (killed, a full disk) would leave an actor that runs on
/// from a state it never had. Parked, it waits, and says why (`loom parked list`).
const COPYING: &str = "a copy (loom import or loom migrate) was writing this actor's journal and did not finish: \
     its snapshots are missing, so it would recover from its default state; start the copy again into an empty store";

/// Parks `actor` in `target` while a copy writes its journal, if the journal starts at a trim
/// point (see [`COPYING`]); whether it did. Parked before the journal is begun, so that no cut
/// leaves it begun and not parked.
async fn hold_for_copy(
    target: &dyn Store,
    actor: &ActorId,
    trimmed_through: Seq,
) -> Result<bool, Failure> {
    if trimmed_through == 0 {
        return Ok(false);
    }
    let park = loom_core::store::Park::new("loom", COPYING);
    target.park(actor, &park, None).await?;
    Ok(true)
}

/// Lets an actor [`hold_for_copy`] parked run again, once its snapshots are written; or, if
/// the source holds it parked (`parked`, which `migrate` copies), puts that park in the
/// copy's place at once rather than leave it runnable until the parks are copied.
async fn release_after_copy(
    target: &dyn Store,
    actor: &ActorId,
    held: bool,
    parked: Option<loom_core::store::Park>,
) -> Result<(), Failure> {
    match (held, parked) {
        (false, _) => {}
        (true, Some(park)) => target.park(actor, &park, None).await?,
        (true, None) => {
            target.unpark(actor).await?;
        }
    }
    Ok(())
}

/// Entries on their way to one journal, appended a batch at a time: at most [`PAGE`] entries
/// and [`MAX_BATCH_BYTES`] encoded, the most a store takes in one append.
#[derive(Default)]
struct Batch {
    entries: Vec<Entry>,
    bytes: usize,
}

impl Batch {
    async fn add(&mut self, target: &dyn Store, actor: &ActorId, e: Entry) -> Result<(), Failure> {
        let size = encode_entry(actor, &e)?.len();
        if self.entries.len() >= PAGE || self.bytes + size > MAX_BATCH_BYTES {
            self.flush(target, actor).await?;
        }
        self.bytes += size;
        self.entries.push(e);
        Ok(())
    }

    async fn flush(&mut self, target: &dyn Store, actor: &ActorId) -> Result<(), Failure> {
        if let Some(first) = self.entries.first() {
            target.append(actor, first.seq, &self.entries).await?;
        }
        self.entries.clear();
        self.bytes = 0;
        Ok(())
    }
}

/// A fingerprint of a journal's kept entries (their encoded frames), for comparing two stores.
async fn fingerprint(store: &dyn Store, a: &ActorId) -> Result<(u64, u32), Failure> {
    let mut crc = crc32fast::Hasher::new();
    let mut n = 0;
    let mut entries = store.read(a, SeqRange::all());
    while let Some(e) = entries.try_next().await? {
        crc.update(&serde_json::to_vec(&e)?);
        n += 1;
    }
    Ok((n, crc.finalize()))
}

/// `into` names the target in the report.
pub async fn migrate(
    source: &dyn Store,
    target: &dyn Store,
    into: &str,
    json: bool,
) -> Result<(), Failure> {
    drain_outboxes(source).await?;
    let actors = all_actors(source).await?;
    let recipients = all_mailboxes(source).await?;
    check_lanes(&recipients, target)?;
    target_is_free(target, &actors, &recipients).await?;
    let progress = bar(actors.len() as u64, "copied")?;
    let mut counts = Counts::default();
    for a in &actors {
        let info = source.info(a).await?;
        let held = hold_for_copy(target, a, info.trimmed_through).await?;
        target.begin_at(a, info.trimmed_through).await?;
        let mut entries = source.read(a, SeqRange::all());
        let mut batch = Batch::default();
        while let Some(e) = entries.try_next().await? {
            batch.add(target, a, e).await?;
            counts.entries += 1;
        }
        batch.flush(target, a).await?;
        for &seq in &info.snapshots {
            let s = source
                .load_snapshot(a, seq)
                .await?
                .ok_or_else(|| Failure(format!("snapshot {seq} of {a} vanished during the copy; is a runtime still using the source?")))?;
            target.save_snapshot(a, &s, info.snapshots.len()).await?;
            counts.snapshots += 1;
        }
        let parked = match held {
            true => source.parked(a).await?,
            false => None,
        };
        release_after_copy(target, a, held, parked).await?;
        counts.journals += 1;
        progress.inc(1);
    }
    let mut per_box: BTreeMap<ActorId, u64> = BTreeMap::new();
    each_message(source, async |m: Waiting| {
        let envelope = renamed(m.envelope, target)?;
        copy_message(target, &envelope, m.deliver_at, m.cancelling).await?;
        *per_box.entry(envelope.to.clone()).or_default() += 1;
        counts.messages += 1;
        Ok(())
    })
    .await?;
    progress.finish_and_clear();
    // Verify the copy: same journals, same entries, same snapshots, same waiting messages.
    for a in &actors {
        let (s, t) = (source.info(a).await?, target.info(a).await?);
        if (s.highest, s.trimmed_through, &s.snapshots)
            != (t.highest, t.trimmed_through, &t.snapshots)
        {
            return Err(Failure(format!(
                "verification failed for {a}: source {s:?}, target {t:?}"
            )));
        }
        if fingerprint(source, a).await? != fingerprint(target, a).await? {
            return Err(Failure(format!(
                "verification failed for {a}: the entries differ"
            )));
        }
    }
    // Parked actors stay parked: their messages wait for `loom parked unpark` there too.
    let mut parked = 0u64;
    let mut after: Option<ActorId> = None;
    loop {
        let page = source.parked_actors(after.as_ref(), PAGE).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (a, park) in &page {
            target.park(a, park, None).await?;
            parked += 1;
        }
    }
    // Dead letters are not copied (see RELIABILITY.md): say how many stay behind.
    let mut dead_left = 0u64;
    let mut after = None;
    loop {
        let page = source.dead_letters(after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        dead_left += page.len() as u64;
    }
    for (a, n) in &per_box {
        let got = target.pending(a).await?;
        if got != *n {
            return Err(Failure(format!(
                "verification failed for the mailbox of {a}: {n} messages sent, {got} there"
            )));
        }
    }
    if json {
        out(serde_json::json!({
            "journals": counts.journals, "entries": counts.entries, "snapshots": counts.snapshots,
            "messages": counts.messages, "parked": parked, "dead_letters_left": dead_left,
            "verified": true, "into": into
        }))
    } else {
        out(format_args!(
            "migrated and verified {} journals, {} entries, {} snapshots, {} messages, {parked} parked actors into {into}",
            counts.journals, counts.entries, counts.snapshots, counts.messages
        ))?;
        if dead_left > 0 {
            out(format_args!(
                "{dead_left} dead letters stay in the source: dead letters are not copied (`loom deadletters ls` lists them there)"
            ))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loom_core::{EmbeddedStore, EntryKind, JournalStore};

    /// The write pass of an import reads the file again: what it reads must be what the check
    /// found whole. A file cut short or changed in place between the two reads fails the
    /// import, naming the file, instead of reporting the counts checked. Before, the second
    /// read of a file cut before its end record dropped the last journal's entries without a
    /// word, and one changed in place was written unchecked.
    #[tokio::test]
    async fn an_export_changed_after_its_check_fails_the_import() {
        let source = EmbeddedStore::in_memory().expect("store");
        let a = ActorId::new("acct", "a").expect("id");
        let entries: Vec<Entry> = (1..=3)
            .map(|n| {
                Entry::new(
                    n,
                    EntryKind::Completed {
                        reply: serde_json::json!(n),
                    },
                )
            })
            .collect();
        source.append(&a, 1, &entries).await.expect("append");
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("export.jsonl");
        export(&source, &path, true).await.expect("export");
        let mut file = std::fs::File::open(&path).expect("open");
        let (counts, _, _) = check(&mut file, &path, "nothing was imported").expect("check");
        let text = std::fs::read_to_string(&path).expect("read");
        let write = |text: String| {
            let path = path.clone();
            async move {
                let target = EmbeddedStore::in_memory().expect("store");
                let r = write_checked(
                    &target,
                    text.as_bytes(),
                    &counts,
                    &path,
                    &ProgressBar::hidden(),
                )
                .await;
                let a = ActorId::new("acct", "a").expect("id");
                (r, target.highest_seq(&a).await.expect("highest"))
            }
        };
        let (whole, highest) = write(text.clone()).await;
        assert!(whole.is_ok() && highest == 3, "{whole:?}, {highest}");
        let lines: Vec<&str> = text.lines().collect();
        let cut: String = lines[..lines.len() - 1]
            .iter()
            .map(|l| format!("{l}\n"))
            .collect();
        let (r, _) = write(cut).await;
        let e = r.expect_err("a file cut before its end record");
        assert!(e.0.contains("ends before its end record"), "{}", e.0);
        let changed = text.replacen("\"reply\":3", "\"reply\":4", 1);
        assert_ne!(
            changed, text,
            "the third entry's reply is in the file: {text}"
        );
        let (r, _) = write(changed).await;
        let e = r.expect_err("a file changed in place");
        assert!(e.0.contains("no longer match their CRC"), "{}", e.0);
    }
}
