//! Fresh stores for test cases.

use std::any::Any;
use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use loom_core::Store;

/// A store for one test case, with whatever must live as long as it (a temporary directory, a
/// key prefix to clean up).
pub struct Fixture {
    /// The store under test.
    pub store: Arc<dyn Store>,
    _guard: Option<Box<dyn Any + Send + Sync>>,
}

impl Fixture {
    /// A fixture around `store`.
    pub fn new(store: impl Store) -> Self {
        Fixture {
            store: Arc::new(store),
            _guard: None,
        }
    }

    /// Keeps `guard` alive as long as the fixture (dropped after the store).
    pub fn with_guard(mut self, guard: impl Any + Send + Sync) -> Self {
        self._guard = Some(Box::new(guard));
        self
    }
}

/// Makes a fresh, empty, isolated [`Fixture`] for every case.
#[derive(Clone)]
pub struct Factory(Arc<dyn Fn() -> BoxFuture<'static, Fixture> + Send + Sync>);

impl Factory {
    /// A factory from an async closure.
    pub fn new<F, Fut>(f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Fixture> + Send + 'static,
    {
        Factory(Arc::new(move || Box::pin(f())))
    }

    /// A fresh fixture.
    pub async fn create(&self) -> Fixture {
        (self.0)().await
    }
}
