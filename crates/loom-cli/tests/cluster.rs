//! `loom cluster status` on a private Redis and a private PostgreSQL, with real runtimes: a
//! node hosting one kind, a node hosting another, and a client-only node share a store; the
//! binary lists them; when the second host stops, its kind's messages wait (shown with no live
//! host) and are run once when it comes back.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::ok;
use loom_cli::store::{Namespace, StoreUrl, open_or_create};
use loom_core::runtime::{Actor, Config, Context, Rejected, Runtime};
use loom_core::{Store, StoreError};
use loom_testkit::runtime::{Counter, partitions_won};
use loom_testkit::servers::{PostgresServer, RedisServer};
use serde_json::Value;

/// A second kind, hosted by another node.
struct Greeter;

impl Actor for Greeter {
    const KIND: &'static str = "greeter";
    type State = u64;
    type Message = String;
    type Reply = String;

    async fn handle(
        &self,
        n: &mut u64,
        _ctx: &mut Context<'_>,
        name: String,
    ) -> Result<String, Rejected> {
        *n += 1;
        Ok(format!("hello {name} #{n}"))
    }
}

fn config(node: &str) -> Config {
    Config {
        node: node.into(),
        // Long enough that no stall of a loaded machine makes a node look gone.
        lease_ttl: Duration::from_secs(5),
        poll_interval: Duration::from_millis(20),
        ..Config::default()
    }
}

async fn host_counters(store: &Arc<dyn Store>) -> Runtime {
    Runtime::builder()
        .store(store.clone())
        .config(config("host-b"))
        .register_actor(Counter)
        .start()
        .await
        .expect("host-b starts")
}

fn kind<'a>(status: &'a Value, kind: &str) -> &'a Value {
    status["kinds"]
        .as_array()
        .expect("kinds")
        .iter()
        .find(|k| k["kind"] == kind)
        .unwrap_or_else(|| panic!("no kind {kind} in {status}"))
}

fn status_json(args: &[&str]) -> Value {
    let mut all = vec!["cluster", "status", "--json"];
    all.extend_from_slice(args);
    serde_json::from_str(ok(&all).trim()).expect("one JSON object")
}

fn waits_for_a_host_and_runs_once_when_it_comes_back(url: &str, ns: &str, ns_flag: &str) {
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let store_url = StoreUrl::parse(url, &Namespace::both(ns)).expect("url");
    let opened = rt.block_on(open_or_create(&store_url)).expect("store");
    let store = opened.store.clone();
    let args = ["--store", url, ns_flag, ns];
    let (a, b, client) = rt.block_on(async {
        let a = Runtime::builder()
            .store(store.clone())
            .config(config("host-a"))
            .register_actor(Greeter)
            .start()
            .await
            .expect("host-a starts");
        let b = host_counters(&store).await;
        let client = Runtime::builder()
            .store(store.clone())
            .config(config("front"))
            .sends_to::<Counter>()
            .sends_to::<Greeter>()
            .start()
            .await
            .expect("the client starts");
        let hi = client.actor::<Greeter>("ann").unwrap();
        assert_eq!(hi.ask("ann".into()).await.unwrap(), "hello ann #1");
        let c = client.actor::<Counter>("x").unwrap();
        assert_eq!(c.ask(1).await.unwrap(), 1);
        // Every node has beaten at least once.
        for _ in 0..100 {
            if store.members().await.unwrap().live().count() == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (a, b, client)
    });

    // Each kind's partitions are owned by its one host (all taken in one look, soon after
    // start).
    let parts = loom_core::partition::ownership_partitions(store.partitions()) as usize;
    let mut s = status_json(&args);
    for _ in 0..100 {
        if kind(&s, "counter")["unowned"] == 0 && kind(&s, "greeter")["unowned"] == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        s = status_json(&args);
    }
    for (k, host) in [("counter", "host-b"), ("greeter", "host-a")] {
        let owners = kind(&s, k)["partitions"].as_array().expect("partitions");
        assert_eq!(owners.len(), parts, "{s}");
        assert!(owners.iter().all(|o| o["owner"] == host), "{s}");
    }
    let table = ok(&[&["cluster", "status"][..], &args[..]].concat());
    for want in [
        "host-a",
        "greeter",
        "host-b",
        "counter",
        "front",
        "(client)",
        "3 live nodes, 0 gone",
        "PARTITION OWNERS",
        &format!("host-b {parts}"),
        &format!("host-a {parts}"),
    ] {
        assert!(table.contains(want), "{want:?} missing:\n{table}");
    }
    let s = status_json(&args);
    assert_eq!(s["nodes"].as_array().unwrap().len(), 3, "{s}");
    assert_eq!(kind(&s, "counter")["hosts"], serde_json::json!(["host-b"]));
    assert_eq!(kind(&s, "greeter")["hosts"], serde_json::json!(["host-a"]));

    // The counters' host stops: it leaves, and counters sent meanwhile wait with no host.
    rt.block_on(async {
        b.shutdown().await;
        let c = client.actor::<Counter>("x").unwrap();
        c.send(10).await.unwrap();
        client.actor::<Counter>("y").unwrap().send(5).await.unwrap();
        // Through several of the other nodes' scans: nobody runs or dead-letters them.
        tokio::time::sleep(Duration::from_millis(300)).await;
    });
    let table = ok(&[&["cluster", "status"][..], &args[..]].concat());
    eprintln!("{table}");
    assert!(
        table.contains("no live host: its messages wait")
            && table.contains("2 live nodes, 0 gone")
            && table.contains("1 kind with waiting messages and no live host"),
        "{table}"
    );
    let s = status_json(&args);
    let counter = kind(&s, "counter");
    assert_eq!(counter["hosts"], serde_json::json!([]), "{s}");
    assert_eq!(counter["waiting"], 2, "{s}");
    // Its partitions were released by the shutdown, not left to run out.
    assert_eq!(counter["unowned"], parts, "{s}");
    assert!(
        s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["node"] != "host-b")
    );
    assert_eq!(kind(&s, "greeter")["waiting"], 0);

    // A parked actor's messages are out of every backlog: counted beside it, with a note
    // (*before*: the status showed nothing of them). It stays parked.
    let z = loom_core::ActorId::new("counter", "z").unwrap();
    rt.block_on(async {
        let park = loom_core::Park::new("host-b", "a bug");
        store.park(&z, &park, None).await.unwrap();
        let m = loom_core::Envelope::new(z.clone(), serde_json::json!(1));
        store.enqueue(&m, None).await.unwrap();
    });
    let s = status_json(&args);
    assert_eq!(
        (
            &kind(&s, "counter")["parked"],
            &kind(&s, "greeter")["parked"]
        ),
        (&serde_json::json!(1), &serde_json::json!(0)),
        "{s}"
    );
    assert_eq!(kind(&s, "counter")["waiting"], 2, "{s}");
    let table = ok(&[&["cluster", "status"][..], &args[..]].concat());
    assert!(
        table.contains("PARKED")
            && table.contains("parked actors' messages wait for `loom parked unpark`"),
        "{table}"
    );

    // It comes back: each waiting message runs once.
    let b = rt.block_on(async {
        let b = host_counters(&store).await;
        let c = client.actor::<Counter>("x").unwrap();
        assert_eq!(c.ask(0).await.unwrap(), 11);
        assert_eq!(
            client.actor::<Counter>("y").unwrap().ask(0).await.unwrap(),
            5
        );
        b
    });
    let s = status_json(&args);
    assert_eq!(kind(&s, "counter")["waiting"], 0, "{s}");
    assert_eq!(kind(&s, "counter")["hosts"], serde_json::json!(["host-b"]));

    // A second process under a live node's name is refused, and says why.
    rt.block_on(async {
        let twin = host_counters(&store).await;
        for _ in 0..100 {
            if !twin.health().is_healthy() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let health = serde_json::to_value(twin.health()).unwrap();
        assert_eq!(health["node"]["state"], "name_taken", "{health}");
        twin.kill().await;
        for rt in [a, b, client] {
            rt.shutdown().await;
        }
        match store
            .heartbeat("host-a", 1, &[], Duration::from_secs(1))
            .await
        {
            Ok(_) => {}
            Err(e @ StoreError::NodeTaken { .. }) => panic!("host-a did not leave: {e}"),
            Err(e) => panic!("{e}"),
        }
    });
    rt.block_on(opened.destroy_namespace()).expect("clean up");
}

#[test]
fn cluster_status_on_redis() {
    let server = RedisServer::start();
    waits_for_a_host_and_runs_once_when_it_comes_back(
        &server.url(),
        "cluster_test",
        "--redis-prefix",
    );
}

/// The same on a private Redis Cluster of three primaries (`redis+cluster://…`, 32 partitions).
#[test]
fn cluster_status_on_a_redis_cluster() {
    let cluster = loom_testkit::servers::RedisCluster::start();
    waits_for_a_host_and_runs_once_when_it_comes_back(
        &cluster.url(),
        "cluster_test",
        "--redis-prefix",
    );
}

#[test]
fn cluster_status_on_postgres() {
    let server = PostgresServer::start();
    waits_for_a_host_and_runs_once_when_it_comes_back(&server.url(), "cluster_test", "--pg-schema");
}

/// What a running node holds is not `loom`'s to take from under it: `journal delete` of an
/// actor whose partition a node owns is refused, naming the node (the node holds the actor's
/// state in memory, and its next turn would append a change of a state no replay can rebuild),
/// and `export` and `migrate` refuse a store with live nodes (a copy reads the journals and
/// then the mailboxes: a message handled in between would be copied and run again), and so do
/// `import` and `migrate` into it (a node would run an actor copied in part: before, they
/// wrote on). Nothing is written: the journal is whole, no file or target store is made. Once
/// the node has shut down, each goes through.
fn live_nodes_keep_delete_and_copies_off_their_store(url: &str, ns: &str, ns_flag: &str) {
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let store_url = StoreUrl::parse(url, &Namespace::both(ns)).expect("url");
    let opened = rt.block_on(open_or_create(&store_url)).expect("store");
    let store = opened.store.clone();
    let counter = loom_core::ActorId::new(Counter::KIND, "x").expect("id");
    let host = rt.block_on(async {
        let host = host_counters(&store).await;
        assert_eq!(host.actor::<Counter>("x").unwrap().ask(3).await.unwrap(), 3);
        host
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let export = dir.path().join("out.json");
    let target = dir.path().join("copy");
    let (export_s, target_s) = (
        export.to_str().expect("path").to_owned(),
        target.to_str().expect("path").to_owned(),
    );
    let entries = || rt.block_on(store.info(&counter)).expect("info").len();
    let before = entries();
    assert!(before > 0);

    let delete = [
        "journal",
        "delete",
        "counter/x",
        "--yes",
        "--store",
        url,
        ns_flag,
        ns,
    ];
    let (done, _, err) = common::loom(&delete);
    assert!(!done, "deleted under its node");
    assert!(
        err.contains("held by host-b") && err.contains("stop it there first"),
        "{err}"
    );
    assert_eq!(entries(), before, "the journal was touched");
    let refused_while_live = |args: &[&str]| {
        let (done, _, err) = common::loom(args);
        assert!(
            !done && err.contains("live node(s) use this one (host-b)"),
            "loom {args:?}: {err}"
        );
    };
    refused_while_live(&["export", "--out", &export_s, "--store", url, ns_flag, ns]);
    refused_while_live(&["migrate", "--from", url, "--to", &target_s, ns_flag, ns]);
    let left: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").collect();
    assert!(left.is_empty(), "written: {left:?}");
    // Into it: an export of another store, at rest, and that store itself.
    let other = tempfile::tempdir().expect("temp dir");
    let (other_store, other_export) = (other.path().join("store"), other.path().join("out.json"));
    let (other_store_s, other_export_s) = (
        other_store.to_str().expect("path").to_owned(),
        other_export.to_str().expect("path").to_owned(),
    );
    rt.block_on(async {
        use loom_core::{Entry, EntryKind, JournalStore};
        let s = loom_core::EmbeddedStore::open(&other_store).expect("open");
        let a = loom_core::ActorId::new("other", "a").expect("id");
        let e = Entry::new(
            1,
            EntryKind::Completed {
                reply: serde_json::json!(1),
            },
        );
        s.append(&a, 1, &[e]).await.expect("append");
    });
    ok(&[
        "export",
        "--out",
        &other_export_s,
        "--store",
        &other_store_s,
    ]);
    refused_while_live(&[
        "import",
        "--in",
        &other_export_s,
        "--store",
        url,
        ns_flag,
        ns,
    ]);
    refused_while_live(&[
        "migrate",
        "--from",
        &other_store_s,
        "--to",
        url,
        ns_flag,
        ns,
    ]);
    let other_a = loom_core::ActorId::new("other", "a").expect("id");
    assert_eq!(
        rt.block_on(store.info(&other_a)).expect("info").highest,
        0,
        "copied into a store in use"
    );

    rt.block_on(host.shutdown());
    ok(&["export", "--out", &export_s, "--store", url, ns_flag, ns]);
    assert!(export.exists());
    ok(&delete);
    assert_eq!(entries(), 0);
    rt.block_on(opened.destroy_namespace()).expect("clean up");
}

#[test]
fn live_nodes_keep_delete_and_copies_off_their_store_on_redis() {
    let server = RedisServer::start();
    live_nodes_keep_delete_and_copies_off_their_store(&server.url(), "live_test", "--redis-prefix");
}

#[test]
fn live_nodes_keep_delete_and_copies_off_their_store_on_postgres() {
    let server = PostgresServer::start();
    live_nodes_keep_delete_and_copies_off_their_store(&server.url(), "live_test", "--pg-schema");
}

/// A message sent on one node to an actor whose partition another node owns runs at once on
/// the owner, woken by the store's signal (Redis pub/sub, PostgreSQL `NOTIFY`), not at its
/// next scan: both hosts scan only every 60 s here, and each ask times out after 10 s. Each
/// host has a store connection of its own, as two processes would (a store skips the signals
/// it sent itself: its own runtime woke the actor).
fn sends_wake_the_owner(url: &str, ns: &str) {
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let store_url = StoreUrl::parse(url, &Namespace::both(ns)).expect("url");
    let opened = rt.block_on(open_or_create(&store_url)).expect("store");
    let other = rt
        .block_on(open_or_create(&store_url))
        .expect("second store");
    let store = opened.store.clone();
    rt.block_on(async {
        let host = |name: &'static str, store: &Arc<dyn Store>| {
            Runtime::builder()
                .store(store.clone())
                .config(Config {
                    poll_interval: Duration::from_secs(60),
                    ask_timeout: Duration::from_secs(10),
                    ..config(name)
                })
                .register_actor(Counter)
                .start()
        };
        let one = host("wake-1", &store).await.expect("wake-1 starts");
        let two = host("wake-2", &other.store).await.expect("wake-2 starts");
        // Wait for the split the roster settles on, not merely any split: a node whose first
        // look saw itself alone may still hold partitions of the other's share while the other
        // already holds the rest (its next look hands them over).
        let parts = loom_core::partition::ownership_partitions(store.partitions());
        let settled = |name| partitions_won(&[Counter::KIND], parts, &["wake-1", "wake-2"], name);
        let (want_one, want_two) = (settled("wake-1"), settled("wake-2"));
        assert!(!want_two.is_empty(), "the other node has a share");
        let mut split = false;
        for _ in 0..200 {
            if one.partitions_owned() == want_one && two.partitions_owned() == want_two {
                split = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            split,
            "the two hosts never divided the partitions as the roster says"
        );
        let mut on_two = 0;
        for i in 0..20u64 {
            let c = one.actor::<Counter>(format!("w{i}")).unwrap();
            assert_eq!(c.ask(i).await.expect("answered by its owner"), i);
            if two.is_active(c.id()) {
                on_two += 1;
                assert!(!one.is_active(c.id()));
            }
        }
        assert!(on_two > 0, "no counter was owned by the other node");
        one.shutdown().await;
        two.shutdown().await;
    });
    rt.block_on(opened.destroy_namespace()).expect("clean up");
}

#[test]
fn sends_wake_the_owner_on_redis() {
    let server = RedisServer::start();
    sends_wake_the_owner(&server.url(), "wake_test");
}

/// On a Redis Cluster the wake-up is published through the cluster and heard on its first node.
#[test]
fn sends_wake_the_owner_on_a_redis_cluster() {
    let cluster = loom_testkit::servers::RedisCluster::start();
    sends_wake_the_owner(&cluster.url(), "wake_test");
}

#[test]
fn sends_wake_the_owner_on_postgres() {
    let server = PostgresServer::start();
    sends_wake_the_owner(&server.url(), "wake_test");
}

/// Looking at a store that does not exist yet (checking a server before the first node starts,
/// or a misspelt prefix or schema) creates nothing: a first connect fixes a store's partition
/// count, so `loom cluster status` creating the store with one partition made every node asking
/// for more be refused ("has 1 partition(s), not 8"). Now the command says there is no store,
/// and a node asking for `partitions` creates it afterwards.
fn inspecting_a_missing_store_creates_nothing(url: &str, ns: &str, ns_flag: &str, partitions: u32) {
    let (done, _out, err) = common::loom(&["cluster", "status", "--store", url, ns_flag, ns]);
    assert!(!done, "status of a store that does not exist succeeded");
    assert!(err.contains("no Loom store"), "unclear error: {err}");
    let (done, _out, err) = common::loom(&["deadletters", "ls", "--store", url, ns_flag, ns]);
    assert!(
        !done && err.contains("no Loom store"),
        "deadletters ls: {err}"
    );
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let more = if url.contains('?') {
        format!("{url}&partitions={partitions}")
    } else {
        format!("{url}?partitions={partitions}")
    };
    let store_url = StoreUrl::parse(&more, &Namespace::both(ns)).expect("url");
    let opened = rt
        .block_on(open_or_create(&store_url))
        .expect("a node asking for more partitions creates the store");
    assert_eq!(opened.store.partitions(), partitions);
    // Now it exists, and the same command reads it.
    let status = status_json(&["--store", url, ns_flag, ns]);
    assert!(status["kinds"].is_array(), "{status}");
    rt.block_on(opened.destroy_namespace()).expect("clean up");
}

#[test]
fn inspecting_a_missing_store_creates_nothing_on_redis() {
    let server = RedisServer::start();
    inspecting_a_missing_store_creates_nothing(&server.url(), "not_yet", "--redis-prefix", 8);
}

#[test]
fn inspecting_a_missing_store_creates_nothing_on_postgres() {
    let server = PostgresServer::start();
    inspecting_a_missing_store_creates_nothing(&server.url(), "not_yet", "--pg-schema", 32);
}

/// A newer `loom` looking at a schema of an older build's version refuses it and migrates
/// nothing (the nodes running on it are of that build); a node's connect migrates it, and then
/// the look reads it.
#[test]
fn a_look_leaves_a_schema_of_an_older_version_as_it_is() {
    let server = PostgresServer::start();
    let url = server.url();
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let store_url = StoreUrl::parse(&url, &Namespace::both("older")).expect("url");
    let opened = rt
        .block_on(open_or_create(&store_url))
        .expect("a node's connect");
    let admin = rt
        .block_on(sqlx::PgPool::connect(&url))
        .expect("admin pool");
    let versions = || {
        rt.block_on(
            sqlx::query_scalar::<_, i32>(
                "SELECT version FROM older.schema_version ORDER BY version",
            )
            .fetch_all(&admin),
        )
        .expect("versions")
    };
    let all: Vec<i32> = (1..=loom_postgres::SCHEMA_VERSION).collect();
    assert_eq!(versions(), all);
    // As the previous build left it (its migrations ran one version short).
    rt.block_on(
        sqlx::query("DELETE FROM older.schema_version WHERE version = $1")
            .bind(loom_postgres::SCHEMA_VERSION)
            .execute(&admin),
    )
    .expect("pretend an older schema");
    for command in [&["cluster", "status"][..], &["journal", "ls"][..]] {
        let mut args = command.to_vec();
        args.extend(["--store", url.as_str(), "--pg-schema", "older"]);
        let (done, _out, err) = common::loom(&args);
        assert!(!done, "{command:?} on an older schema succeeded");
        assert!(
            err.contains("older than this build"),
            "unclear error: {err}"
        );
        assert_eq!(
            versions(),
            all[..all.len() - 1],
            "{command:?} migrated the schema"
        );
    }
    drop(opened);
    let node = rt
        .block_on(open_or_create(&store_url))
        .expect("a node's connect migrates");
    assert_eq!(versions(), all);
    let status = status_json(&["--store", &url, "--pg-schema", "older"]);
    assert!(status["kinds"].is_array(), "{status}");
    rt.block_on(node.destroy_namespace()).expect("clean up");
}
