//! Where a command reads and writes: the store itself (`--store`), or a running
//! application's admin API (`--url`). The commands an admin API serves take a [`Source`] and
//! print the same either way; the others need the store ([`Source::store`]).

use futures::TryStreamExt;
use loom_core::runtime::{self, CancelTarget, Cancellation};
use loom_core::{ActorId, DeadLetter, Entry, JournalInfo, Park, Seq, SeqRange, Timestamp, Waiting};

use loom_cli::output::Failure;
use loom_cli::store::Opened;

use crate::remote::Remote;

/// A store opened directly, or a running application's admin API.
pub enum Source {
    /// The store itself.
    Store(Opened),
    /// The admin API of the application that holds it.
    Remote(Remote),
}

/// An actor with waiting messages.
pub struct Mailbox {
    /// The actor.
    pub actor: ActorId,
    /// How many messages wait.
    pub pending: u64,
    /// Whether it is parked.
    pub parked: bool,
}

/// Every page of a store listing keyed by the last item of the page before.
async fn all_pages<T, K, F, Fut>(mut page: F, key: impl Fn(&T) -> K) -> Result<Vec<T>, Failure>
where
    F: FnMut(Option<K>) -> Fut,
    Fut: Future<Output = Result<Vec<T>, loom_core::StoreError>>,
{
    const PAGE: usize = 1000;
    let mut all: Vec<T> = Vec::new();
    loop {
        let p = page(all.last().map(&key)).await?;
        let done = p.len() < PAGE;
        all.extend(p);
        if done {
            return Ok(all);
        }
    }
}

/// The refusal of `command`, which works on the store itself, given the admin API at `url`.
pub fn store_only(command: &str, url: &str) -> Failure {
    Failure(format!(
        "`loom {command}` works on the store itself, not through an application's admin API ({url})\nwhat to do: give --store instead of --url: a Redis or PostgreSQL store opens while applications run, an embedded one once its application has stopped. Over --url: journal ls/show/stats, mailbox ls/show/cancel, deadletters ls/requeue/purge, parked ls/unpark"
    ))
}

impl Source {
    /// The store itself, for `command`, which only works on one (not through an admin API).
    pub fn store(&self, command: &str) -> Result<&Opened, Failure> {
        match self {
            Source::Store(o) => Ok(o),
            Source::Remote(r) => Err(store_only(command, r.label())),
        }
    }

    /// Every actor with a journal, and what its journal holds.
    pub async fn journals(&self) -> Result<Vec<(ActorId, JournalInfo)>, Failure> {
        match self {
            Source::Store(o) => {
                let s = &*o.store;
                let mut out = Vec::new();
                for a in crate::journal::all_actors(s).await? {
                    let info = s.info(&a).await?;
                    out.push((a, info));
                }
                Ok(out)
            }
            Source::Remote(r) => r.journals().await,
        }
    }

    /// Every actor with a journal, what its journal holds, and how many messages wait for it.
    pub async fn journals_with_pending(&self) -> Result<Vec<(ActorId, JournalInfo, u64)>, Failure> {
        let journals = self.journals().await?;
        match self {
            Source::Store(o) => {
                let mut out = Vec::with_capacity(journals.len());
                for (a, info) in journals {
                    let pending = o.store.pending(&a).await?;
                    out.push((a, info, pending));
                }
                Ok(out)
            }
            // One listing of the mailboxes instead of a request per journal.
            Source::Remote(r) => {
                let pending: std::collections::HashMap<ActorId, u64> = r
                    .mailboxes(None)
                    .await?
                    .into_iter()
                    .map(|m| (m.actor, m.pending))
                    .collect();
                Ok(journals
                    .into_iter()
                    .map(|(a, info)| {
                        let p = pending.get(&a).copied().unwrap_or(0);
                        (a, info, p)
                    })
                    .collect())
            }
        }
    }

    /// What an actor's journal holds, and how many messages wait for it.
    pub async fn actor(&self, a: &ActorId) -> Result<(JournalInfo, u64), Failure> {
        match self {
            Source::Store(o) => Ok((o.store.info(a).await?, o.store.pending(a).await?)),
            Source::Remote(r) => r.actor(a).await,
        }
    }

    /// Hands `each` the entries of `a` from `from` to `to`, in order.
    pub async fn entries(
        &self,
        a: &ActorId,
        from: Seq,
        to: Seq,
        mut each: impl FnMut(Entry) -> Result<(), Failure>,
    ) -> Result<(), Failure> {
        match self {
            Source::Store(o) => {
                let mut entries = o.store.read(a, SeqRange::all().from(from).to(to));
                while let Some(e) = entries.try_next().await? {
                    each(e)?;
                }
                Ok(())
            }
            Source::Remote(r) => r.entries(a, from, to, each).await,
        }
    }

    /// The messages waiting for `a`, in order.
    pub async fn messages(&self, a: &ActorId) -> Result<Vec<Waiting>, Failure> {
        match self {
            Source::Store(o) => {
                let s = &*o.store;
                all_pages(|after| s.messages(a, after, 1000), |w| w.position).await
            }
            Source::Remote(r) => r.messages(a).await,
        }
    }

    /// Actors with waiting messages, the runtime's own lanes left out (only of `kind`, if
    /// given).
    pub async fn mailboxes(&self, kind: Option<&str>) -> Result<Vec<Mailbox>, Failure> {
        let mut out = Vec::new();
        match self {
            Source::Store(o) => {
                let s = &*o.store;
                let page =
                    |after: Option<ActorId>| async move { s.mailboxes(after.as_ref(), 1000).await };
                for a in all_pages(page, Clone::clone).await? {
                    if a.is_system() || kind.is_some_and(|k| a.kind() != k) {
                        continue;
                    }
                    out.push(Mailbox {
                        pending: s.pending(&a).await?,
                        parked: s.parked(&a).await?.is_some(),
                        actor: a,
                    });
                }
            }
            Source::Remote(r) => {
                for m in r.mailboxes(kind).await? {
                    if !m.actor.is_system() {
                        out.push(Mailbox {
                            actor: m.actor,
                            pending: m.pending,
                            parked: m.parked,
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    /// Up to `limit` dead letters after `after`, oldest first.
    pub async fn dead_letters(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, Failure> {
        match self {
            Source::Store(o) => Ok(o.store.dead_letters(after, limit).await?),
            Source::Remote(r) => r.dead_letters(after, limit).await,
        }
    }

    /// Puts a dead letter back in its mailbox; returns its position there.
    pub async fn requeue(&self, id: u64) -> Result<u64, Failure> {
        match self {
            Source::Store(o) => Ok(o.store.requeue_dead_letter(id).await?),
            Source::Remote(r) => r.requeue(id).await,
        }
    }

    /// Purges dead letters: those given up on before `before`, these `ids`, or (neither) all;
    /// a key one still holds is settled first. Returns how many.
    pub async fn purge(&self, before: Option<Timestamp>, ids: &[u64]) -> Result<u64, Failure> {
        match self {
            Source::Store(o) => {
                let reply_ttl = runtime::Config::default().reply_ttl;
                let s = &*o.store;
                Ok(match ids {
                    [] => runtime::purge_dead_letters(s, before, reply_ttl).await?,
                    ids => runtime::purge_dead_letter_ids(s, ids, reply_ttl).await?,
                })
            }
            Source::Remote(r) => r.purge(before, ids).await,
        }
    }

    /// Every parked actor.
    pub async fn parked(&self) -> Result<Vec<(ActorId, Park)>, Failure> {
        match self {
            Source::Store(o) => {
                let s = &*o.store;
                let page = |after: Option<ActorId>| async move {
                    s.parked_actors(after.as_ref(), 1000).await
                };
                all_pages(page, |(a, _)| a.clone()).await
            }
            Source::Remote(r) => r.parked().await,
        }
    }

    /// Unparks `a`; `None` if it was not parked.
    pub async fn unpark(&self, a: &ActorId) -> Result<Option<Park>, Failure> {
        match self {
            Source::Store(o) => Ok(o.store.unpark(a).await?),
            Source::Remote(r) => r.unpark(a).await,
        }
    }

    /// Asks that an invocation of `a` be cancelled.
    pub async fn cancel(
        &self,
        a: &ActorId,
        target: &CancelTarget,
    ) -> Result<Cancellation, Failure> {
        match self {
            Source::Store(o) => Ok(runtime::cancel(&*o.store, a, target).await?),
            Source::Remote(r) => r.cancel(a, target).await,
        }
    }
}
