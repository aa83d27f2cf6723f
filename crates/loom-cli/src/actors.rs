//! `loom parked …` and `loom mailbox …`: actors that wait for someone (a fix, a host), and
//! what an operator does about them.

use loom_core::runtime::{BuryError, CancelTarget, Cancellation, bury_mailbox};
use loom_core::{IdempotencyKey, MessageId, Store};
use serde::Serialize;

use crate::journal::parse_actor;
use crate::output::{Failure, out, report, table};
use crate::source::Source;

/// `loom parked ls`: every parked actor, with why, where and when.
pub async fn parked(source: &Source, json: bool) -> Result<(), Failure> {
    let all = source.parked().await?;
    if json {
        for (a, p) in &all {
            out(serde_json::json!({
                "actor": a.as_str(), "reason": p.reason, "message_id": p.message_id,
                "step": p.step, "node": p.node, "at": p.at.to_string(),
            }))?;
        }
        return Ok(());
    }
    if all.is_empty() {
        return out("no actor is parked");
    }
    let rows = all
        .iter()
        .map(|(a, p)| {
            vec![
                a.to_string(),
                p.at.to_string(),
                p.message_id.map_or("-".to_owned(), |m| m.to_string()),
                p.step.map_or("-".to_owned(), |s| s.to_string()),
                p.reason.replace('\n', " "),
            ]
        })
        .collect();
    table(&["ACTOR", "AT", "MESSAGE", "STEP", "REASON"], rows, &[3])?;
    out(format_args!(
        "{} parked; `loom parked unpark ACTOR` lets one run again (fix its code first)",
        all.len()
    ))
}

/// `loom parked unpark ACTOR`.
pub async fn unpark(source: &Source, actor: &str, json: bool) -> Result<(), Failure> {
    let a = parse_actor(actor)?;
    match source.unpark(&a).await? {
        Some(p) => report(
            json,
            serde_json::json!({
                "unparked": a.as_str(), "message_id": p.message_id, "reason": p.reason,
            }),
            format_args!(
                "{a} is unparked: its mailbox is open again, and the message it stopped at{} \
                 runs again (its delivery count kept) on the next node that hosts {} (it was \
                 parked: {})",
                p.message_id.map_or(String::new(), |m| format!(" ({m})")),
                a.kind(),
                p.reason
            ),
        ),
        None => Err(Failure(format!("{a} is not parked"))),
    }
}

#[derive(Serialize)]
struct Mailbox {
    actor: String,
    pending: u64,
    parked: bool,
}

/// `loom mailbox ls [--kind K]`: actors with waiting messages, how many, and whether parked.
pub async fn mailboxes(source: &Source, kind: Option<&str>, json: bool) -> Result<(), Failure> {
    let rows: Vec<Mailbox> = source
        .mailboxes(kind)
        .await?
        .into_iter()
        .map(|m| Mailbox {
            actor: m.actor.to_string(),
            pending: m.pending,
            parked: m.parked,
        })
        .collect();
    if json {
        for r in &rows {
            out(serde_json::to_string(r)?)?;
        }
        return Ok(());
    }
    let cells = rows
        .iter()
        .map(|r| {
            vec![
                r.actor.clone(),
                r.pending.to_string(),
                (if r.parked { "yes" } else { "-" }).to_owned(),
            ]
        })
        .collect();
    table(&["ACTOR", "PENDING", "PARKED"], cells, &[1])?;
    let total: u64 = rows.iter().map(|r| r.pending).sum();
    out(format_args!(
        "{} mailboxes, {total} messages waiting",
        rows.len()
    ))
}

/// `loom mailbox show ACTOR`: the actor's waiting messages, in order.
pub async fn show(source: &Source, actor: &str, json: bool) -> Result<(), Failure> {
    let a = parse_actor(actor)?;
    let all = source.messages(&a).await?;
    if json {
        for w in &all {
            out(serde_json::json!({
                "position": w.position,
                "message_id": w.envelope.id,
                "idempotency_key": w.envelope.idempotency_key,
                "out": w.out,
                "deliver_at": w.deliver_at.map(|t| t.to_string()),
                "cancelling": w.cancelling,
                "retire": w.envelope.retire,
                "payload": w.envelope.payload,
            }))?;
        }
        return Ok(());
    }
    if all.is_empty() {
        return out(format_args!("{a} has no waiting message"));
    }
    let mut rows = Vec::with_capacity(all.len());
    for w in &all {
        let state = match (w.out, w.deliver_at) {
            (true, _) => "out (running or suspended)".to_owned(),
            (false, Some(at)) => format!("due at {at}"),
            (false, None) => "waiting its turn".to_owned(),
        };
        // The runtime's own retirement message (`Config::retention`).
        let state = match w.envelope.retire {
            Some(r) => format!(
                "retirement ({}), {state}",
                format!("{:?}", r.reason).to_lowercase()
            ),
            None => state,
        };
        rows.push(vec![
            w.position.to_string(),
            w.envelope.id.to_string(),
            state,
            (if w.cancelling { "asked" } else { "-" }).to_owned(),
            w.envelope
                .idempotency_key
                .as_ref()
                .map_or("-", |k| k.as_str())
                .to_owned(),
        ]);
    }
    table(
        &["POSITION", "MESSAGE", "STATE", "CANCEL", "KEY"],
        rows,
        &[0],
    )?;
    out(format_args!("{} messages waiting for {a}", all.len()))
}

/// `loom mailbox cancel ACTOR (--message ID | --key K)`.
pub async fn cancel(
    source: &Source,
    actor: &str,
    message: Option<MessageId>,
    key: Option<&str>,
    json: bool,
) -> Result<(), Failure> {
    let a = parse_actor(actor)?;
    let target = match (message, key) {
        (Some(m), _) => CancelTarget::Message(m),
        (None, Some(k)) => CancelTarget::Key(
            IdempotencyKey::new(k).map_err(|e| Failure(format!("bad --key: {e}")))?,
        ),
        (None, None) => return Err(Failure("give --message ID or --key KEY".into())),
    };
    let found = source.cancel(&a, &target).await?;
    if json && found != Cancellation::NotFound {
        return out(serde_json::to_string(&found)?);
    }
    match found {
        Cancellation::Requested { message, position } => out(format_args!(
            "{a}: message {message} (position {position}) is asked to be cancelled; its next \
             durable wait ends with Cancelled (at once if it is suspended), and its caller gets \
             the outcome the handler gives"
        )),
        Cancellation::NotFound => Err(Failure(format!(
            "{a} has no such message waiting: it finished (its caller has its outcome), was \
             dead-lettered, or never came"
        ))),
    }
}

/// `loom mailbox bury ACTOR --reason R --yes`.
pub async fn bury(
    store: &dyn Store,
    actor: &str,
    reason: &str,
    yes: bool,
    json: bool,
) -> Result<(), Failure> {
    let a = parse_actor(actor)?;
    let pending = store.pending(&a).await?;
    if pending == 0 {
        return Err(Failure(format!("{a} has no waiting message")));
    }
    if !yes {
        return Err(Failure(format!(
            "this moves the {pending} messages waiting for {a} to the dead letters; run again \
             with --yes to do it"
        )));
    }
    let owner = format!("loom-cli-{}", std::process::id());
    match bury_mailbox(store, &a, reason, &owner).await {
        Ok(n) => {
            let left = store.pending(&a).await?;
            // Why some are left: one of them out (handed out to a run cut short, or waiting in
            // a durable sleep or for an event) holds up the rest until it comes back; else
            // they are delayed.
            let out = left > 0 && store.messages(&a, None, 1000).await?.iter().any(|w| w.out);
            let why = if out {
                "one is out (handed out to a run cut short, or in a durable wait) and holds up \
                 the rest until it comes back: run this again then"
            } else {
                "delayed, not due yet"
            };
            report(
                json,
                serde_json::json!({
                    "actor": a.as_str(), "buried": n, "still_waiting": left, "one_out": out,
                }),
                format_args!(
                    "{a}: {n} messages moved to the dead letters ({left} still waiting: {why}); \
                     `loom deadletters ls` shows them"
                ),
            )
        }
        Err(BuryError::Store(loom_core::StoreError::LeaseHeld {
            owner,
            remaining_ms,
            ..
        })) => Err(Failure(format!(
            "{a} is held by {owner} (the node that owns its partition, or another tool); stop \
             it there first (a lease left by a process that died runs out in {:.1} s)",
            remaining_ms as f64 / 1000.0
        ))),
        Err(e) => Err(Failure(e.to_string())),
    }
}
