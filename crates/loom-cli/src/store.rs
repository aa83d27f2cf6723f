//! Choosing a store by URL: `embedded:PATH` (or a bare path), `memory:`.

use std::path::PathBuf;
use std::sync::Arc;

use loom_core::{EmbeddedStore, Store};

use crate::output::Failure;

/// A parsed store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// The embedded store in a directory.
    Embedded(PathBuf),
    /// A fresh in-memory store.
    Memory,
}

impl StoreUrl {
    /// Parses `embedded:PATH`, `memory:`, or a bare path.
    pub fn parse(url: &str) -> Result<Self, Failure> {
        if let Some(path) = url.strip_prefix("embedded:") {
            if path.is_empty() {
                return Err(Failure(
                    "embedded: needs a directory, as in embedded:./loom-data".into(),
                ));
            }
            return Ok(StoreUrl::Embedded(PathBuf::from(path)));
        }
        if url == "memory:" {
            return Ok(StoreUrl::Memory);
        }
        if let Some((scheme, _)) = url.split_once("://") {
            return Err(Failure(format!(
                "store URL scheme {scheme:?} is not supported by this build; use embedded:PATH, a directory, or memory:"
            )));
        }
        if url.is_empty() {
            return Err(Failure("the store URL is empty".into()));
        }
        Ok(StoreUrl::Embedded(PathBuf::from(url)))
    }

    /// How the store is named in output.
    pub fn label(&self) -> String {
        match self {
            StoreUrl::Embedded(p) => format!("embedded:{}", p.display()),
            StoreUrl::Memory => "memory:".to_owned(),
        }
    }
}

/// An open store.
pub struct Opened {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The embedded store, when it is one (for its group-commit counters).
    pub embedded: Option<EmbeddedStore>,
}

/// Opens a store that must already exist (for inspecting: never creates an empty one by mistake).
pub fn open_existing(url: &StoreUrl) -> Result<Opened, Failure> {
    match url {
        StoreUrl::Embedded(path) => {
            if !path.exists() {
                return Err(Failure(format!(
                    "no store at {}: the directory does not exist (pass --store DIR)",
                    path.display()
                )));
            }
            let s = EmbeddedStore::open_existing(path)?;
            Ok(Opened {
                store: Arc::new(s.clone()),
                embedded: Some(s),
            })
        }
        StoreUrl::Memory => Err(Failure(
            "memory: holds nothing to inspect; pass the store to look at with --store".into(),
        )),
    }
}

/// Opens a store, creating it if needed.
pub fn open_or_create(url: &StoreUrl) -> Result<Opened, Failure> {
    let s = match url {
        StoreUrl::Embedded(path) => EmbeddedStore::open(path)?,
        StoreUrl::Memory => EmbeddedStore::in_memory()?,
    };
    Ok(Opened {
        store: Arc::new(s.clone()),
        embedded: Some(s),
    })
}
