//! Choosing a store by URL: `embedded:PATH` (or a bare path), `memory:`, `redis://…`,
//! `rediss://…`, `redis+unix://…`.

use std::path::PathBuf;
use std::sync::Arc;

use loom_core::{EmbeddedStore, Store};
use loom_redis::{RedisOptions, RedisStore};

use crate::output::Failure;

/// A parsed store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// The embedded store in a directory.
    Embedded(PathBuf),
    /// A fresh in-memory store.
    Memory,
    /// A Redis server (the URL as given), and the key prefix to use on it.
    Redis { url: String, prefix: String },
}

impl StoreUrl {
    /// Parses `embedded:PATH`, `memory:`, a Redis URL, or a bare path.
    pub fn parse(url: &str, redis_prefix: &str) -> Result<Self, Failure> {
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
            return match scheme {
                "redis" | "rediss" | "redis+unix" | "unix" => Ok(StoreUrl::Redis {
                    url: url.to_owned(),
                    prefix: redis_prefix.to_owned(),
                }),
                "postgres" | "postgresql" => Err(Failure(
                    "PostgreSQL stores are not supported by this build yet; use embedded:PATH or redis://".into(),
                )),
                other => Err(Failure(format!(
                    "store URL scheme {other:?} is not known; use embedded:PATH, a directory, memory:, or redis://host[:port]"
                ))),
            };
        }
        if url.is_empty() {
            return Err(Failure("the store URL is empty".into()));
        }
        Ok(StoreUrl::Embedded(PathBuf::from(url)))
    }

    /// How the store is named in output (without credentials).
    pub fn label(&self) -> String {
        match self {
            StoreUrl::Embedded(p) => format!("embedded:{}", p.display()),
            StoreUrl::Memory => "memory:".to_owned(),
            StoreUrl::Redis { url, prefix } => {
                let host = url.rsplit_once('@').map_or(url.as_str(), |(_, h)| h);
                let scheme = url.split_once("://").map_or("redis", |(s, _)| s);
                let host = host.strip_prefix(&format!("{scheme}://")).unwrap_or(host);
                format!("{scheme}://{host} (prefix {prefix})")
            }
        }
    }
}

/// An open store.
pub struct Opened {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The embedded store, when it is one (for its group-commit counters).
    pub embedded: Option<EmbeddedStore>,
    /// The Redis store, when it is one.
    pub redis: Option<RedisStore>,
}

async fn redis(url: &str, prefix: &str) -> Result<Opened, Failure> {
    let options = RedisOptions {
        prefix: prefix.to_owned(),
        ..RedisOptions::default()
    };
    let s = RedisStore::connect_with(url, options).await?;
    Ok(Opened {
        store: Arc::new(s.clone()),
        embedded: None,
        redis: Some(s),
    })
}

/// Opens a store that must already exist (for inspecting: never creates an empty one by mistake).
pub async fn open_existing(url: &StoreUrl) -> Result<Opened, Failure> {
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
                redis: None,
            })
        }
        StoreUrl::Memory => Err(Failure(
            "memory: holds nothing to inspect; pass the store to look at with --store".into(),
        )),
        StoreUrl::Redis { url, prefix } => redis(url, prefix).await,
    }
}

/// Opens a store, creating it if needed.
pub async fn open_or_create(url: &StoreUrl) -> Result<Opened, Failure> {
    let s = match url {
        StoreUrl::Embedded(path) => EmbeddedStore::open(path)?,
        StoreUrl::Memory => EmbeddedStore::in_memory()?,
        StoreUrl::Redis { url, prefix } => return redis(url, prefix).await,
    };
    Ok(Opened {
        store: Arc::new(s.clone()),
        embedded: Some(s),
        redis: None,
    })
}
