//! Choosing a store by URL: `embedded:PATH` (or a bare path), `memory:`, `redis://…`,
//! `rediss://…`, `redis+unix://…`, `postgres://…`.

use std::path::PathBuf;
use std::sync::Arc;

use loom_core::{EmbeddedStore, Store};
use loom_postgres::{PostgresOptions, PostgresStore};
use loom_redis::{RedisOptions, RedisStore};

use crate::output::Failure;

/// Where on a shared server a store lives: the Redis key prefix and the PostgreSQL schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// Key prefix on Redis.
    pub redis_prefix: String,
    /// Schema on PostgreSQL.
    pub pg_schema: String,
}

impl Namespace {
    /// The same name for both.
    pub fn both(name: &str) -> Self {
        Namespace {
            redis_prefix: name.to_owned(),
            pg_schema: name.to_owned(),
        }
    }
}

/// A parsed store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// The embedded store in a directory, and the partition count asked for
    /// (`embedded:DIR?partitions=N`; only a new store takes it).
    Embedded(PathBuf, Option<u32>),
    /// A fresh in-memory store.
    Memory,
    /// A Redis server (the URL as given), and the key prefix to use on it.
    Redis { url: String, prefix: String },
    /// A PostgreSQL database (the URL as given), and the schema to use in it.
    Postgres { url: String, schema: String },
}

/// The schemes of store URLs, as `parse` knows them: a bare path starting with one of these and
/// a colon is a URL missing its `//`, not a directory.
const KNOWN_SCHEMES: &[&str] = &[
    "redis",
    "rediss",
    "redis+unix",
    "unix",
    "redis+cluster",
    "postgres",
    "postgresql",
    "memory",
];

impl StoreUrl {
    /// Parses `embedded:PATH`, `memory:`, a Redis or PostgreSQL URL, or a bare path.
    pub fn parse(url: &str, ns: &Namespace) -> Result<Self, Failure> {
        if let Some(path) = url.strip_prefix("embedded:") {
            if path.is_empty() {
                return Err(Failure(
                    "embedded: needs a directory, as in embedded:./loom-data".into(),
                ));
            }
            let (path, partitions) = match path.rsplit_once("?partitions=") {
                Some((dir, n)) => {
                    let n: u32 = n.parse().map_err(|_| {
                        Failure(format!(
                            "partitions={n:?} is not a number; use embedded:DIR?partitions=N"
                        ))
                    })?;
                    loom_core::partition::check_partitions(n)?;
                    (dir, Some(n))
                }
                None => (path, None),
            };
            return Ok(StoreUrl::Embedded(PathBuf::from(path), partitions));
        }
        if url == "memory:" {
            return Ok(StoreUrl::Memory);
        }
        if let Some((scheme, _)) = url.split_once("://") {
            return match scheme {
                "redis" | "rediss" | "redis+unix" | "unix" | "redis+cluster" => {
                    url_params(url)?;
                    Ok(StoreUrl::Redis {
                        url: url.to_owned(),
                        prefix: ns.redis_prefix.clone(),
                    })
                }
                "postgres" | "postgresql" => {
                    if url_params(url)?.1.replicas.is_some() {
                        return Err(Failure(
                            "replicas= is a Redis parameter: a PostgreSQL store's commits wait for its standbys through synchronous_standby_names".into(),
                        ));
                    }
                    Ok(StoreUrl::Postgres {
                        url: url.to_owned(),
                        schema: ns.pg_schema.clone(),
                    })
                }
                other => Err(Failure(format!(
                    "store URL scheme {other:?} is not known; use embedded:PATH, a directory, memory:, redis://host[:port] or postgres://host/db"
                ))),
            };
        }
        if url.is_empty() {
            return Err(Failure("the store URL is empty".into()));
        }
        // A bare path is a directory, created by `import` and `migrate`'s target: a URL with
        // its `//` or `embedded:` missing would make a directory of that name instead.
        if let Some((scheme, _)) = url.split_once(':')
            && KNOWN_SCHEMES.contains(&scheme)
        {
            return Err(Failure(format!(
                "{url:?} is not a store URL (\"{scheme}://…\"); for a directory of that name write embedded:{url}"
            )));
        }
        if url.contains("?partitions=") {
            return Err(Failure(format!(
                "{url:?} is a path with a partition count, which only embedded:DIR?partitions=N takes: write embedded:{url}"
            )));
        }
        Ok(StoreUrl::Embedded(PathBuf::from(url), None))
    }

    /// How the store is named in output (without credentials).
    pub fn label(&self) -> String {
        match self {
            StoreUrl::Embedded(p, None) => format!("embedded:{}", p.display()),
            StoreUrl::Embedded(p, Some(n)) => format!("embedded:{}?partitions={n}", p.display()),
            StoreUrl::Memory => "memory:".to_owned(),
            StoreUrl::Redis { url, prefix } => {
                format!("{} (prefix {prefix})", without_credentials(url))
            }
            StoreUrl::Postgres { url, schema } => {
                format!("{} (schema {schema})", without_credentials(url))
            }
        }
    }
}

/// `scheme://host/…` without any `user:password@`: everything up to the last `@` goes, so
/// that a password is dropped even where it holds a `/` or the scheme is missing (a path with
/// an `@` loses its start too: this is for messages, not for use).
pub fn without_credentials(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}{host}")
}

/// An open store.
pub struct Opened {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The embedded store, when it is one (for its group-commit counters).
    pub embedded: Option<EmbeddedStore>,
    /// The Redis store, when it is one.
    pub redis: Option<RedisStore>,
    /// The PostgreSQL store, when it is one.
    pub postgres: Option<PostgresStore>,
}

impl Opened {
    fn embedded(s: EmbeddedStore) -> Self {
        Opened {
            store: Arc::new(s.clone()),
            embedded: Some(s),
            redis: None,
            postgres: None,
        }
    }

    /// Removes everything a benchmark wrote under its own prefix or schema on a shared server.
    pub async fn destroy_namespace(&self) -> Result<(), Failure> {
        if let Some(r) = &self.redis {
            r.destroy().await?;
        }
        if let Some(p) = &self.postgres {
            p.destroy().await?;
        }
        Ok(())
    }
}

/// Loom's own parameters of a Redis or PostgreSQL URL, taken out before the client reads it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UrlParams {
    /// `partitions=N`: the partition count asked of a new store.
    pub partitions: Option<u32>,
    /// `replicas=N` (Redis): the replicas every write waits for
    /// ([`RedisOptions::replication`](loom_redis::RedisOptions::replication)).
    pub replicas: Option<u32>,
}

/// A Redis or PostgreSQL URL's own part and Loom's parameters in it
/// (`redis://host/?partitions=N&replicas=1`, `postgres://host/db?partitions=32`).
pub fn url_params(url: &str) -> Result<(String, UrlParams), Failure> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), UrlParams::default()));
    };
    let mut params = UrlParams::default();
    let mut rest = Vec::new();
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (name, slot) = if let Some(n) = param.strip_prefix("partitions=") {
            (("partitions", n), &mut params.partitions)
        } else if let Some(n) = param.strip_prefix("replicas=") {
            (("replicas", n), &mut params.replicas)
        } else {
            rest.push(param);
            continue;
        };
        let (name, n) = name;
        if slot.is_some() {
            return Err(Failure(format!(
                "{}: {name}= is given twice",
                without_credentials(url)
            )));
        }
        let n: u32 = n.parse().map_err(|_| {
            Failure(format!(
                "{name}={n:?} is not a number; use ?{name}=N after the URL"
            ))
        })?;
        *slot = Some(n);
    }
    if let Some(n) = params.partitions {
        loom_core::partition::check_partitions(n)?;
    }
    if params.replicas == Some(0) {
        return Err(Failure(
            "replicas=0 waits for no replica: leave the parameter out instead".into(),
        ));
    }
    let url = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((url, params))
}

/// A URL's own part and the partition count it asks a new store for ([`url_params`]; the
/// other parameters are taken out too).
pub fn url_partitions(url: &str) -> Result<(String, Option<u32>), Failure> {
    url_params(url).map(|(url, p)| (url, p.partitions))
}

/// The nodes of a `redis+cluster://host:port,host:port/` URL, as `redis://host:port/` each
/// (credentials before the first host go to every node); `None` for another URL.
pub fn redis_cluster_nodes(url: &str) -> Option<Vec<String>> {
    let rest = url.strip_prefix("redis+cluster://")?;
    // The authority ends at the path or the query; credentials end at its last '@'.
    // `split` yields at least one piece (the whole string when there is no separator).
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let (auth, hosts) = match authority.rsplit_once('@') {
        Some((auth, hosts)) => (format!("{auth}@"), hosts),
        None => (String::new(), authority),
    };
    Some(
        hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("redis://{auth}{h}/"))
            .collect(),
    )
}

async fn redis(url: &str, prefix: &str, create: bool) -> Result<Opened, Failure> {
    let (url, params) = url_params(url)?;
    let options = RedisOptions {
        prefix: prefix.to_owned(),
        partitions: params.partitions,
        replication: params.replicas.map(loom_redis::Replication::new),
        ..RedisOptions::default()
    };
    let s = match (redis_cluster_nodes(&url), create) {
        (Some(nodes), true) => RedisStore::connect_cluster(&nodes, options).await?,
        (Some(nodes), false) => RedisStore::connect_cluster_existing(&nodes, options).await?,
        (None, true) => RedisStore::connect_with(&url, options).await?,
        (None, false) => RedisStore::connect_existing(&url, options).await?,
    };
    Ok(Opened {
        store: Arc::new(s.clone()),
        embedded: None,
        redis: Some(s),
        postgres: None,
    })
}

async fn postgres(url: &str, schema: &str, create: bool) -> Result<Opened, Failure> {
    let (url, partitions) = url_partitions(url)?;
    let url = url.as_str();
    let options = PostgresOptions {
        schema: schema.to_owned(),
        partitions,
        ..PostgresOptions::default()
    };
    let s = if create {
        PostgresStore::connect_with(url, options).await?
    } else {
        PostgresStore::connect_existing(url, options).await?
    };
    Ok(Opened {
        store: Arc::new(s.clone()),
        embedded: None,
        redis: None,
        postgres: Some(s),
    })
}

/// Opens a store that must already exist (for inspecting: never creates an empty one by mistake).
pub async fn open_existing(url: &StoreUrl) -> Result<Opened, Failure> {
    match url {
        StoreUrl::Embedded(path, partitions) => {
            if !path.exists() {
                return Err(Failure(format!(
                    "no store at {}: the directory does not exist (pass --store DIR)",
                    path.display()
                )));
            }
            let store = EmbeddedStore::open_existing(path)?;
            if let Some(n) = partitions
                && store.partitions() != *n
            {
                return Err(Failure(format!(
                    "the store in {} has {} partition(s), not {n}; `loom store repartition` changes that",
                    path.display(),
                    store.partitions()
                )));
            }
            Ok(Opened::embedded(store))
        }
        StoreUrl::Memory => Err(Failure(
            "memory: holds nothing to inspect; pass the store to look at with --store".into(),
        )),
        StoreUrl::Redis { url, prefix } => redis(url, prefix, false).await,
        StoreUrl::Postgres { url, schema } => postgres(url, schema, false).await,
    }
}

/// Opens a store, creating it if needed.
pub async fn open_or_create(url: &StoreUrl) -> Result<Opened, Failure> {
    let s = match url {
        StoreUrl::Embedded(path, partitions) => EmbeddedStore::open_with(
            path,
            loom_core::EmbeddedOptions {
                partitions: *partitions,
                ..loom_core::EmbeddedOptions::default()
            },
        )?,
        StoreUrl::Memory => EmbeddedStore::in_memory()?,
        StoreUrl::Redis { url, prefix } => return redis(url, prefix, true).await,
        StoreUrl::Postgres { url, schema } => return postgres(url, schema, true).await,
    };
    Ok(Opened::embedded(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redis_cluster_url_names_its_nodes() {
        assert_eq!(
            redis_cluster_nodes("redis+cluster://u:pw@10.0.0.1:7000,10.0.0.2:7001/"),
            Some(vec![
                "redis://u:pw@10.0.0.1:7000/".to_owned(),
                "redis://u:pw@10.0.0.2:7001/".to_owned()
            ])
        );
        assert_eq!(
            redis_cluster_nodes("redis+cluster://h:1"),
            Some(vec!["redis://h:1/".to_owned()])
        );
        assert_eq!(redis_cluster_nodes("redis://h:1/"), None);
        assert_eq!(
            redis_cluster_nodes("redis+cluster://h:1,h:2?x=@y"),
            Some(vec!["redis://h:1/".to_owned(), "redis://h:2/".to_owned()])
        );
        assert!(
            StoreUrl::parse(
                "redis+cluster://h:1,h:2/?partitions=8",
                &Namespace::both("n")
            )
            .is_ok()
        );
    }

    #[test]
    fn a_urls_partition_count_is_taken_out_of_its_query() {
        assert_eq!(
            url_partitions("redis://h:1/0").unwrap(),
            ("redis://h:1/0".to_owned(), None)
        );
        assert_eq!(
            url_partitions("redis://h:1/0?partitions=32").unwrap(),
            ("redis://h:1/0".to_owned(), Some(32))
        );
        assert_eq!(
            url_partitions("redis+unix:///r.sock?user=u&partitions=3&pass=p").unwrap(),
            ("redis+unix:///r.sock?user=u&pass=p".to_owned(), Some(3))
        );
        assert_eq!(
            url_partitions("redis://h/?partitions=3&").unwrap(),
            ("redis://h/".to_owned(), Some(3))
        );
        assert_eq!(
            url_partitions("postgres:///db?host=/run/pg&partitions=32&user=u").unwrap(),
            ("postgres:///db?host=/run/pg&user=u".to_owned(), Some(32))
        );
        assert_eq!(
            url_params("redis://h/0?replicas=2&partitions=3").unwrap(),
            (
                "redis://h/0".to_owned(),
                UrlParams {
                    partitions: Some(3),
                    replicas: Some(2)
                }
            )
        );
        for bad in [
            "redis://h/?partitions=x",
            "redis://h/?partitions=0",
            "redis://h/?partitions=257",
            "redis://h/?partitions=2&partitions=3",
            "postgres://h/db?partitions=x",
            "redis://h/?replicas=0",
            "redis://h/?replicas=x",
            "redis://h/?replicas=1&replicas=1",
            "postgres://h/db?replicas=1",
        ] {
            assert!(
                StoreUrl::parse(bad, &Namespace::both("ns")).is_err(),
                "{bad} parsed"
            );
        }
    }

    /// A URL missing its `//`, or a partition count on a bare path, would otherwise name a
    /// directory that `import` or `migrate` creates and fills while the store meant is untouched.
    #[test]
    fn mistyped_urls_are_refused_not_taken_for_directories() {
        let ns = Namespace::both("ns");
        for bad in [
            "redis:host:6379",
            "postgres:db",
            "postgresql:",
            "redis+cluster:h:1",
            "memory:x",
            "./new?partitions=4",
        ] {
            let e = StoreUrl::parse(bad, &ns).expect_err(bad);
            assert!(e.0.contains(&format!("embedded:{bad}")), "{bad}: {}", e.0);
        }
        // Said as the error says, each is the directory it names.
        assert_eq!(
            StoreUrl::parse("embedded:redis:host:6379", &ns).expect("parse"),
            StoreUrl::Embedded(PathBuf::from("redis:host:6379"), None)
        );
        for fine in ["./redis:x", "data/postgres:1", "C:/loom"] {
            assert_eq!(
                StoreUrl::parse(fine, &ns).expect(fine),
                StoreUrl::Embedded(PathBuf::from(fine), None)
            );
        }
    }

    #[test]
    fn urls_parse_and_labels_hide_credentials() {
        let ns = Namespace::both("ns");
        assert_eq!(
            StoreUrl::parse("postgres://u:secret@db:5433/app?sslmode=require", &ns)
                .expect("parse")
                .label(),
            "postgres://db:5433/app?sslmode=require (schema ns)"
        );
        assert_eq!(
            StoreUrl::parse("redis://:pw@host:6380/0", &ns)
                .expect("parse")
                .label(),
            "redis://host:6380/0 (prefix ns)"
        );
        assert_eq!(
            StoreUrl::parse("redis+unix:///tmp/r.sock", &ns)
                .expect("parse")
                .label(),
            "redis+unix:///tmp/r.sock (prefix ns)"
        );
        assert_eq!(
            StoreUrl::parse("./data", &ns).expect("parse"),
            StoreUrl::Embedded(PathBuf::from("./data"), None)
        );
        assert_eq!(without_credentials("u:pw@host:8080"), "host:8080");
        assert_eq!(without_credentials("http://u:p/w@h/x"), "http://h/x");
        assert!(StoreUrl::parse("mysql://x", &ns).is_err());
        assert!(StoreUrl::parse("embedded:", &ns).is_err());
        assert!(StoreUrl::parse("", &ns).is_err());
    }
}
