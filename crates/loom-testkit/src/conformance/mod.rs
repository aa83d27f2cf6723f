//! The store conformance suite.
//!
//! Modelled on the Akka persistence TCK and Restate's log tests. Each function below returns the
//! named cases for one store trait; a case gets a fresh store from the backend's [`Factory`] and
//! panics on the first broken rule. Test names read `conformance::<backend>::<trait>::<case>`, so
//! `cargo test conformance` runs them all and `cargo test -- --list` shows the same list for
//! every backend.

mod idempotency;
mod journal;
mod lease;
mod mailbox;
mod membership;
mod park;
pub mod partitions;
mod turn;

use std::sync::Arc;

use futures::future::BoxFuture;
use libtest_mimic::{Arguments, Trial};
use loom_core::Store;

use crate::Factory;

/// One named rule check.
#[derive(Clone, Copy)]
pub struct Case {
    /// The case's name.
    pub name: &'static str,
    /// Runs it against a fresh store; panics if the rule is broken.
    pub run: fn(Arc<dyn Store>) -> BoxFuture<'static, ()>,
}

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        vec![$($crate::conformance::Case {
            name: stringify!($name),
            run: |store| Box::pin($name(store)),
        }),*]
    };
}
pub(crate) use cases;

fn trials(backend: &str, concern: &str, cases: Vec<Case>, factory: &Factory) -> Vec<Trial> {
    cases
        .into_iter()
        .map(|case| {
            let factory = factory.clone();
            Trial::test(
                format!("conformance::{backend}::{concern}::{}", case.name),
                move || {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .map_err(|e| format!("tokio runtime: {e}"))?;
                    rt.block_on(async move {
                        let fixture = factory.create().await;
                        (case.run)(fixture.store.clone()).await;
                        drop(fixture);
                    });
                    Ok(())
                },
            )
        })
        .collect()
}

/// The [`loom_core::JournalStore`] cases.
pub fn journal(backend: &str, factory: &Factory) -> Vec<Trial> {
    trials(backend, "journal", journal::cases(), factory)
}

/// The [`loom_core::Mailbox`] cases.
pub fn mailbox(backend: &str, factory: &Factory) -> Vec<Trial> {
    trials(backend, "mailbox", mailbox::cases(), factory)
}

/// The [`loom_core::LeaseManager`] cases.
pub fn lease(backend: &str, factory: &Factory) -> Vec<Trial> {
    trials(backend, "lease", lease::cases(), factory)
}

/// The [`loom_core::IdempotencyStore`] cases.
pub fn idempotency(backend: &str, factory: &Factory) -> Vec<Trial> {
    trials(backend, "idempotency", idempotency::cases(), factory)
}

/// The [`loom_core::Parking`] cases.
pub fn park(backend: &str, factory: &Factory) -> Vec<Trial> {
    trials(backend, "park", park::cases(), factory)
}

/// The [`loom_core::Membership`] cases.
pub fn membership(backend: &str, factory: &Factory) -> Vec<Trial> {
    trials(backend, "membership", membership::cases(), factory)
}

/// The [`loom_core::Store::commit_turn`] cases.
pub fn turn(backend: &str, factory: &Factory) -> Vec<Trial> {
    trials(backend, "turn", turn::cases(), factory)
}

/// The partition, outbox and relay cases.
pub fn partition(backend: &str, factory: &Factory) -> Vec<Trial> {
    trials(backend, "partition", partitions::cases(), factory)
}

/// Every case for every trait.
pub fn all(backend: &str, factory: &Factory) -> Vec<Trial> {
    let mut out = journal(backend, factory);
    out.extend(mailbox(backend, factory));
    out.extend(lease(backend, factory));
    out.extend(idempotency(backend, factory));
    out.extend(park(backend, factory));
    out.extend(membership(backend, factory));
    out.extend(turn(backend, factory));
    out.extend(partition(backend, factory));
    out
}

/// Runs every case as a test binary's `main` (with `harness = false`) and exits with its result.
pub fn run(backend: &str, factory: Factory) -> ! {
    let args = Arguments::from_args();
    libtest_mimic::run(&args, all(backend, &factory)).exit()
}
