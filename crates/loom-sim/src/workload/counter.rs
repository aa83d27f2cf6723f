//! Counters asked from every node, and the check that each counter's replies are linearizable
//! against its journal.
//!
//! A [`Counter`] adds to its value and replies with the new value ([`CounterMsg::Add`]), or
//! replies with the value ([`CounterMsg::Get`]). Clients on every node ask, each call with an
//! idempotency key, retried with that key until it is answered; each call records when it was
//! first invoked and when (and with what) it was answered, as ticks of one counter shared by
//! the run (the simulation runs on one thread, so tick order is real-time order).
//!
//! The check ([`linearizable`]) takes the actor's whole journal (trimmed entries too, from
//! [`SimStore::history`]) as the witness order and requires:
//! 1. the journal agrees with itself: replaying its invocations in seq order from 0 gives the
//!    reply each one recorded (a lost or doubled state patch, a replay from the wrong snapshot,
//!    shows here);
//! 2. every answered call is in the journal exactly once, in its counter's journal, with the
//!    reply the client got (an ack of a turn that never committed, a stale reply from an
//!    idempotency record, a call applied twice);
//! 3. real-time order: a call answered before another call was first invoked comes first in
//!    the journal (a reply sent from a turn that was later taken back and run again elsewhere).
//!
//! A history that passes is linearizable: the journal's order is a total order of the calls
//! that respects real time, in which every reply is the sequential counter's.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use loom_core::runtime::{Actor, AskOptions, Context, Rejected, Runtime, RuntimeBuilder};
use loom_core::{ActorId, Entry, EntryKind};
use serde::{Deserialize, Serialize};

use super::{Errors, ask_until, key, paced};
use crate::store::SimStore;

/// A counter.
#[derive(Default)]
pub struct Counter;

/// What a counter is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CounterMsg {
    /// Add; the reply is the new value.
    Add(i64),
    /// The reply is the value.
    Get,
}

impl Actor for Counter {
    const KIND: &'static str = "counter";
    type State = i64;
    type Message = CounterMsg;
    type Reply = i64;

    async fn handle(
        &self,
        value: &mut i64,
        _ctx: &mut Context<'_>,
        msg: CounterMsg,
    ) -> Result<i64, Rejected> {
        if let CounterMsg::Add(n) = msg {
            *value += n;
        }
        Ok(*value)
    }
}

/// One client call, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The counter asked (`counter/c<n>`).
    pub counter: u32,
    /// Its idempotency key.
    pub key: String,
    /// What was asked.
    pub msg: CounterMsg,
    /// Tick of its first invocation, if it was ever made.
    pub invoked: Option<u64>,
    /// Tick of its answer and the reply, if it was answered.
    pub answered: Option<(u64, i64)>,
}

/// The counter workload of a run: `calls` calls spread over `counters` counters.
#[derive(Clone)]
pub struct Counters {
    /// Counters asked.
    pub counters: u32,
    /// Calls made.
    pub calls: u32,
    log: Arc<Mutex<Vec<Call>>>,
    ticks: Arc<AtomicU64>,
    errors: Errors,
}

impl Counters {
    /// `calls` calls over `counters` counters (at least 1), drawn from `seed`.
    pub fn new(seed: u64, counters: u32, calls: u32) -> Counters {
        let counters = counters.max(1);
        let log = (0..calls)
            .map(|i| {
                let mut rng = fastrand::Rng::with_seed(seed ^ 0xc0_c0 ^ (u64::from(i) << 24));
                let counter = rng.u32(..counters);
                let msg = if rng.u8(..4) == 0 {
                    CounterMsg::Get
                } else {
                    CounterMsg::Add(rng.i64(1..=9))
                };
                Call {
                    counter,
                    key: format!("call-{i}"),
                    msg,
                    invoked: None,
                    answered: None,
                }
            })
            .collect();
        Counters {
            counters,
            calls,
            log: Arc::new(Mutex::new(log)),
            ticks: Arc::default(),
            errors: Errors::default(),
        }
    }

    /// Registers the counter on a node.
    pub fn register(builder: RuntimeBuilder) -> RuntimeBuilder {
        builder.register::<Counter>()
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Vec<Call>> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tick(&self) -> u64 {
        self.ticks.fetch_add(1, Ordering::Relaxed)
    }

    /// Calls answered so far.
    pub fn answered(&self) -> usize {
        self.log().iter().filter(|c| c.answered.is_some()).count()
    }

    /// Makes every call below `upto` not answered yet, spread `over` the round, call `i`
    /// through node `i % nodes`, each retried with its key until answered.
    pub async fn drive(self, nodes: Vec<Runtime>, upto: u32, over: Duration) {
        let pending: Vec<u32> = {
            let log = self.log();
            (0..upto.min(self.calls))
                .filter(|i| log[*i as usize].answered.is_none())
                .collect()
        };
        let this = &self;
        paced(pending, over, |i| {
            let rt = nodes[i as usize % nodes.len()].clone();
            async move { this.call(&rt, i).await }
        })
        .await;
    }

    /// Makes call `i` until it is answered; records its first invocation and its answer (or
    /// the error it was answered with for good).
    async fn call(&self, rt: &Runtime, i: u32) {
        let (counter, name, msg) = {
            let mut log = self.log();
            let call = &mut log[i as usize];
            if call.invoked.is_none() {
                call.invoked = Some(self.tick());
            }
            (call.counter, call.key.clone(), call.msg)
        };
        let actor = match rt.actor::<Counter>(format!("c{counter}")) {
            Ok(a) => a,
            Err(e) => {
                self.errors.push(format!("counter/c{counter}: {e}"));
                return;
            }
        };
        let reply = ask_until(|| {
            let opts = AskOptions {
                idempotency_key: Some(key(name.clone())),
                timeout: None,
                ..Default::default()
            };
            actor.ask_with(msg, opts)
        })
        .await;
        let at = self.tick();
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                self.errors
                    .push(format!("call {name} to counter/c{counter}: {e}"));
                return;
            }
        };
        let mut log = self.log();
        let call = &mut log[i as usize];
        if call.answered.is_none() {
            call.answered = Some((at, reply));
        }
    }

    /// Checks every counter's replies against its journal (see the [module docs](self)).
    pub fn check(&self, store: &SimStore) -> Result<(), String> {
        self.errors.check()?;
        let mut journals = BTreeMap::new();
        for c in 0..self.counters {
            let id = ActorId::new(Counter::KIND, format!("c{c}")).map_err(|e| e.to_string())?;
            journals.insert(c, store.history(&id).map_err(|e| e.to_string())?);
        }
        linearizable(&self.log(), &journals)
    }
}

/// One invocation in a journal.
struct Applied {
    seq: u64,
    key: Option<String>,
    msg: CounterMsg,
    reply: i64,
}

/// Reads a counter's journal: its invocations in order, each with its reply; fails where the
/// journal does not agree with itself (rule 1 of the [module docs](self)).
fn invocations(counter: u32, journal: &[Entry]) -> Result<Vec<Applied>, String> {
    let mut out = Vec::new();
    let mut open: Option<(u64, Option<String>, CounterMsg)> = None;
    let mut value = 0i64;
    for entry in journal {
        match &entry.kind {
            EntryKind::Invoked {
                payload,
                idempotency_key,
                ..
            } => {
                if let Some((seq, ..)) = open {
                    return Err(format!(
                        "counter/c{counter}: the invocation at seq {seq} has no reply before the next one at {}",
                        entry.seq
                    ));
                }
                let msg: CounterMsg = serde_json::from_value(payload.clone()).map_err(|e| {
                    format!(
                        "counter/c{counter}: seq {}: not a counter message: {e}",
                        entry.seq
                    )
                })?;
                open = Some((
                    entry.seq,
                    idempotency_key.as_ref().map(|k| k.as_str().to_owned()),
                    msg,
                ));
            }
            EntryKind::Completed { reply } => {
                let Some((seq, key, msg)) = open.take() else {
                    return Err(format!(
                        "counter/c{counter}: a reply at seq {} answers no invocation",
                        entry.seq
                    ));
                };
                let reply: i64 = serde_json::from_value(reply.clone()).map_err(|e| {
                    format!(
                        "counter/c{counter}: seq {}: not a counter reply: {e}",
                        entry.seq
                    )
                })?;
                if let CounterMsg::Add(n) = msg {
                    value += n;
                }
                if reply != value {
                    return Err(format!(
                        "counter/c{counter}: the invocation at seq {seq} replied {reply}, but its \
                         journal's calls before it add up to {value}"
                    ));
                }
                out.push(Applied {
                    seq,
                    key,
                    msg,
                    reply,
                });
            }
            EntryKind::StatePatched { .. } => {}
            other => {
                return Err(format!(
                    "counter/c{counter}: seq {}: a counter never writes {}",
                    entry.seq,
                    other.name()
                ));
            }
        }
    }
    // An invocation left open at the end would be one still running: the check runs after
    // every call was answered, and a counter's turn is one atomic write.
    if let Some((seq, ..)) = open {
        return Err(format!(
            "counter/c{counter}: the invocation at seq {seq} has no reply"
        ));
    }
    Ok(out)
}

/// Checks `calls` against the counters' whole journals (`journals[c]` for `counter/c<c>`):
/// the three rules of the [module docs](self). Calls never answered may or may not be in a
/// journal; calls answered must be. Every invocation in a journal must be one of `calls`, with
/// its message, at its counter.
///
/// ```
/// use std::collections::BTreeMap;
/// use loom_sim::workload::counter::{Call, CounterMsg, linearizable};
///
/// // No call was answered and no journal was written: nothing to object to.
/// let call = Call { counter: 0, key: "k".into(), msg: CounterMsg::Get, invoked: Some(0), answered: None };
/// assert!(linearizable(&[call.clone()], &BTreeMap::from([(0, vec![])])).is_ok());
/// // An answered call that no journal holds was acknowledged and lost.
/// let answered = Call { answered: Some((1, 0)), ..call };
/// assert!(linearizable(&[answered], &BTreeMap::from([(0, vec![])])).is_err());
/// ```
pub fn linearizable(calls: &[Call], journals: &BTreeMap<u32, Vec<Entry>>) -> Result<(), String> {
    let by_key: BTreeMap<&str, &Call> = calls.iter().map(|c| (c.key.as_str(), c)).collect();
    // Where each key was applied: (counter, position in its journal, seq, reply).
    let mut applied: BTreeMap<String, (u32, usize, u64, i64)> = BTreeMap::new();
    for (&counter, journal) in journals {
        for (pos, a) in invocations(counter, journal)?.into_iter().enumerate() {
            let Some(key) = a.key else {
                return Err(format!(
                    "counter/c{counter}: the invocation at seq {} ({:?}) has no idempotency key; \
                     every call has one",
                    a.seq, a.msg
                ));
            };
            let Some(call) = by_key.get(key.as_str()) else {
                return Err(format!(
                    "counter/c{counter}: the invocation at seq {} has key {key}, which no client sent",
                    a.seq
                ));
            };
            if call.counter != counter || call.msg != a.msg {
                return Err(format!(
                    "call {key} ({:?} to counter/c{}) was applied as {:?} by counter/c{counter} \
                     (seq {})",
                    call.msg, call.counter, a.msg, a.seq
                ));
            }
            if let Some((c, _, seq, _)) =
                applied.insert(key.clone(), (counter, pos, a.seq, a.reply))
            {
                return Err(format!(
                    "call {key} applied twice: counter/c{c} seq {seq} and counter/c{counter} seq {}",
                    a.seq
                ));
            }
        }
    }
    for call in calls {
        let Some((_, reply)) = call.answered else {
            continue;
        };
        let Some(&(counter, _, seq, recorded)) = applied.get(&call.key) else {
            return Err(format!(
                "call {} was answered {reply} but is in no journal (acknowledged, then lost)",
                call.key
            ));
        };
        if recorded != reply {
            return Err(format!(
                "call {} was answered {reply}, but its journal (counter/c{counter} seq {seq}) \
                 replied {recorded}",
                call.key
            ));
        }
    }
    // Real time: a call answered before another was first invoked precedes it in the journal.
    for a in calls {
        let (Some((answered, _)), Some(&(ca, pa, sa, _))) = (a.answered, applied.get(&a.key))
        else {
            continue;
        };
        for b in calls {
            let (Some(invoked), Some(&(cb, pb, sb, _))) = (b.invoked, applied.get(&b.key)) else {
                continue;
            };
            if ca == cb && answered < invoked && pb < pa {
                return Err(format!(
                    "call {} was answered before call {} was invoked, yet counter/c{ca} applied \
                     it after (seq {sa} > seq {sb}): not linearizable",
                    a.key, b.key
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use loom_core::{IdempotencyKey, MessageId};
    use serde_json::json;

    /// A journal of `(key, msg, reply)` invocations, each as the runtime writes it.
    fn journal(calls: &[(&str, CounterMsg, i64)]) -> Vec<Entry> {
        let mut out = Vec::new();
        for (key, msg, reply) in calls {
            let seq = out.len() as u64 + 1;
            out.push(Entry::new(
                seq,
                EntryKind::Invoked {
                    message_id: MessageId::new(),
                    payload: serde_json::to_value(msg).unwrap(),
                    idempotency_key: Some(IdempotencyKey::new(*key).unwrap()),
                    requeued_from: None,
                },
            ));
            out.push(Entry::new(
                seq + 1,
                EntryKind::Completed {
                    reply: json!(reply),
                },
            ));
        }
        out
    }

    fn call(key: &str, msg: CounterMsg, invoked: u64, answered: Option<(u64, i64)>) -> Call {
        Call {
            counter: 0,
            key: key.into(),
            msg,
            invoked: Some(invoked),
            answered,
        }
    }

    fn one(j: Vec<Entry>) -> BTreeMap<u32, Vec<Entry>> {
        BTreeMap::from([(0, j)])
    }

    use CounterMsg::{Add, Get};

    #[test]
    fn a_linearizable_history_passes() {
        // a and b overlap (either order is fine); c starts after a's answer.
        let j = journal(&[("b", Add(2), 2), ("a", Add(1), 3), ("c", Get, 3)]);
        let calls = [
            call("a", Add(1), 0, Some((3, 3))),
            call("b", Add(2), 1, Some((2, 2))),
            call("c", Get, 4, Some((5, 3))),
            // Never answered, never applied: allowed.
            call("d", Add(5), 6, None),
        ];
        linearizable(&calls, &one(j)).unwrap();
    }

    #[test]
    fn an_acknowledged_call_missing_from_the_journal_fails() {
        let j = journal(&[("a", Add(1), 1)]);
        let calls = [
            call("a", Add(1), 0, Some((1, 1))),
            call("b", Add(1), 2, Some((3, 2))),
        ];
        let e = linearizable(&calls, &one(j)).unwrap_err();
        assert!(e.contains("call b") && e.contains("lost"), "{e}");
    }

    #[test]
    fn a_reply_the_journal_did_not_give_fails() {
        let j = journal(&[("a", Add(1), 1), ("b", Get, 1)]);
        let calls = [
            call("a", Add(1), 0, Some((1, 1))),
            // A stale read: the client saw 0.
            call("b", Get, 2, Some((3, 0))),
        ];
        let e = linearizable(&calls, &one(j)).unwrap_err();
        assert!(e.contains("call b was answered 0"), "{e}");
    }

    #[test]
    fn a_call_applied_twice_fails() {
        let j = journal(&[("a", Add(1), 1), ("a", Add(1), 2)]);
        let calls = [call("a", Add(1), 0, Some((1, 1)))];
        let e = linearizable(&calls, &one(j)).unwrap_err();
        assert!(e.contains("applied twice"), "{e}");
    }

    #[test]
    fn a_journal_that_disagrees_with_itself_fails() {
        // The second invocation's reply ignores the first's add: a lost state patch.
        let j = journal(&[("a", Add(1), 1), ("b", Add(1), 1)]);
        let e = linearizable(&[], &one(j)).unwrap_err();
        assert!(e.contains("add up to 2"), "{e}");
    }

    #[test]
    fn real_time_order_is_required() {
        // a was answered (tick 1) before b was invoked (tick 2), but the journal put b first.
        let j = journal(&[("b", Add(2), 2), ("a", Add(1), 3)]);
        let calls = [
            call("a", Add(1), 0, Some((1, 3))),
            call("b", Add(2), 2, Some((3, 2))),
        ];
        let e = linearizable(&calls, &one(j)).unwrap_err();
        assert!(e.contains("not linearizable"), "{e}");
    }

    #[test]
    fn a_call_applied_by_another_counter_fails() {
        let calls = [call("a", Add(1), 0, Some((1, 1)))];
        let journals = BTreeMap::from([(0, vec![]), (1, journal(&[("a", Add(1), 1)]))]);
        let e = linearizable(&calls, &journals).unwrap_err();
        assert!(e.contains("applied as Add(1) by counter/c1"), "{e}");
    }

    #[test]
    fn a_call_applied_with_another_message_fails() {
        let calls = [call("a", Add(1), 0, None)];
        let e = linearizable(&calls, &one(journal(&[("a", Add(2), 2)]))).unwrap_err();
        assert!(e.contains("applied as Add(2)"), "{e}");
    }

    #[test]
    fn an_invocation_no_client_sent_fails() {
        let e = linearizable(&[], &one(journal(&[("x", Add(2), 2)]))).unwrap_err();
        assert!(e.contains("which no client sent"), "{e}");
    }
}
