//! `loom … --url`: a running application's admin API in place of its store (an embedded store
//! is locked by the process that runs it). Run as a user runs it: the real `loom` binary
//! against `loom serve`, which holds the store as an application does. Every command the admin
//! API serves prints, over `--url`, exactly what it prints over the store; writes need the
//! token; the other commands are refused with what to do.

mod common;

use std::time::Duration;

use common::{dead_letter, free_port, json_lines, loom, loom_with, ok, seeded, serve, stop};
use loom_core::{
    ActorId, EmbeddedStore, Entry, EntryKind, Envelope, IdempotencyKey, IdempotencyStore,
    JournalStore, Mailbox, Park, Parking, Reservation,
};
use serde_json::json;

/// The commands an admin API serves, reading.
const READS: &[&[&str]] = &[
    &["journal", "ls"],
    &["journal", "show", "counter/a"],
    &["journal", "show", "counter/b", "--from", "70", "--to", "72"],
    // Longer than a page of the admin API (500): followed page by page.
    &["journal", "show", "long/x"],
    &["journal", "show", "long/x", "--from", "450", "--to", "1050"],
    &["journal", "stats"],
    &["journal", "stats", "counter/c"],
    &["mailbox", "ls"],
    &["mailbox", "ls", "--kind", "inbox"],
    &["mailbox", "show", "inbox/x"],
    &["mailbox", "show", "counter/a"],
    &["mailbox", "show", "inbox/a b%/c?d"],
    &["deadletters", "ls"],
    &["deadletters", "ls", "--limit", "1"],
    &["deadletters", "ls", "--limit", "600", "--after", "1"],
    &["parked", "ls"],
];

/// The seeded store, plus a parked actor, a second dead letter whose sender still holds its
/// idempotency key (a purge settles it), and lists longer than a page of the admin API: a
/// journal of 1 200 entries, 600 more mailboxes.
fn fixture(dir: &std::path::Path) -> (ActorId, IdempotencyKey) {
    seeded(dir);
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    rt.block_on(async {
        let store = EmbeddedStore::open(dir).expect("open");
        let parked = ActorId::new("inbox", "parked").unwrap();
        let park = Park {
            step: Some(3),
            ..Park::new("node-1", "the code changed")
        };
        store.park(&parked, &park, None).await.unwrap();
        let keyed = ActorId::new("inbox", "keyed").unwrap();
        let key = IdempotencyKey::new("order-9").unwrap();
        let ttl = Duration::from_secs(3600);
        assert_eq!(
            store.reserve(&keyed, &key, ttl).await.unwrap(),
            Reservation::Reserved
        );
        let mut m = Envelope::new(keyed.clone(), json!("poison"));
        m.idempotency_key = Some(key.clone());
        dead_letter(&store, m, "poison too").await;
        let long = ActorId::new("long", "x").unwrap();
        for from in (1..=1200).step_by(100) {
            let batch: Vec<Entry> = (from..from + 100)
                .map(|seq| Entry::new(seq, EntryKind::Completed { reply: json!(seq) }))
                .collect();
            store.append(&long, from, &batch).await.unwrap();
        }
        // A key a URL must encode ('/', '%', a space, '?').
        let odd = ActorId::new("inbox", "a b%/c?d").unwrap();
        store
            .enqueue(&Envelope::new(odd, json!("odd")), None)
            .await
            .unwrap();
        for i in 0..600 {
            let to = ActorId::new("many", format!("m{i:03}")).unwrap();
            store
                .enqueue(&Envelope::new(to, json!(i)), None)
                .await
                .unwrap();
        }
        (keyed, key)
    })
}

/// Dead letters of a MB each in the store in `dir`: more than a page of the admin API's bytes,
/// whose pages then end early, with `next` to go on from.
fn heavy_dead_letters(dir: &std::path::Path) {
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    rt.block_on(async {
        let store = EmbeddedStore::open(dir).expect("open");
        let pad = "x".repeat(1000 * 1000);
        for i in 0..10 {
            let to = ActorId::new("heavy", format!("h{i}")).unwrap();
            dead_letter(
                &store,
                Envelope::new(to, json!({ "pad": pad })),
                "too heavy",
            )
            .await;
        }
    })
}

fn with(cmd: &[&str], place: &[&str], json: bool) -> Vec<String> {
    let mut args: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
    args.extend(place.iter().map(|s| s.to_string()));
    if json {
        args.push("--json".into());
    }
    args
}

fn run(args: &[String]) -> String {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&a)
}

#[test]
fn every_read_over_url_prints_what_it_prints_over_the_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    fixture(dir.path());
    heavy_dead_letters(dir.path());
    let store = dir.path().to_str().expect("utf-8 path");
    let (server, base) = serve(store, &[], None);

    // The store is locked while the "application" runs: --store fails, --url reads it.
    let (locked, _, err) = loom(&["journal", "ls", "--store", store]);
    assert!(!locked, "the embedded store opened while held: {err}");
    let mut over_url = Vec::new();
    for cmd in READS {
        for json in [false, true] {
            over_url.push(run(&with(cmd, &["--url", &base], json)));
        }
    }
    // With a trailing '/', the same address.
    let again = ok(&["journal", "ls", "--url", &format!("{base}/")]);
    assert_eq!(again, over_url[0]);
    // A flag on the command line beats the environment; the environment alone is used.
    let (done, env_beaten, err) = loom_with(
        &["journal", "ls", "--url", &base],
        &[("LOOM_STORE", "/nowhere")],
    );
    assert!(done && env_beaten == over_url[0], "{err}");
    let (done, from_env, err) = loom_with(&["journal", "ls"], &[("LOOM_URL", &base)]);
    assert!(done && from_env == over_url[0], "{err}");
    let (done, _, err) = loom_with(
        &["journal", "ls"],
        &[("LOOM_URL", &base), ("LOOM_STORE", store)],
    );
    assert!(
        !done && err.contains("LOOM_URL and LOOM_STORE are both set"),
        "{err}"
    );
    // A key that a URL's path cannot hold.
    let (done, _, err) = loom(&["mailbox", "show", "inbox/..", "--url", &base]);
    assert!(
        !done && err.contains("cannot be named in a URL's path"),
        "{err}"
    );
    // The token never goes in cleartext to another machine (refused before connecting).
    let (done, _, err) = loom_with(
        &["deadletters", "requeue", "1", "--url", "http://192.0.2.1:9"],
        &[("LOOM_TOKEN", "s3cret")],
    );
    assert!(
        !done && err.contains("refusing to send LOOM_TOKEN in cleartext"),
        "{err}"
    );
    // A read sends no token, so it is not refused for one (it fails only to connect).
    // (0.0.0.0 is not loopback, and connecting to it on a closed port fails at once.)
    let port = free_port();
    let (done, _, err) = loom_with(
        &["journal", "ls", "--url", &format!("http://0.0.0.0:{port}")],
        &[("LOOM_TOKEN", "s3cret")],
    );
    assert!(
        !done && !err.contains("refusing") && err.contains("cannot reach"),
        "{err}"
    );
    // Credentials in the address are refused, and never printed.
    let with_user = base.replacen("http://", "http://user:hunter2@", 1);
    let (done, _, err) = loom(&["journal", "ls", "--url", &with_user]);
    assert!(
        !done && err.contains("without a user or password") && !err.contains("hunter2"),
        "{err}"
    );
    let out_dir = tempfile::tempdir().expect("temp dir");
    let out_file = out_dir.path().join("never-written");
    let out_file = out_file.to_str().expect("utf-8 path");
    let (done, _, err) = loom(&["export", "--url", &with_user, "--out", out_file]);
    assert!(!done && !err.contains("hunter2"), "{err}");

    // What the admin API does not serve is refused with what to do, and reads nothing.
    for (cmd, name) in [
        (&["journal", "verify"][..], "journal verify"),
        (&["journal", "compact", "counter/a"], "journal compact"),
        (&["journal", "stats", "--bytes"], "journal stats --bytes"),
        (&["mailbox", "bury", "inbox/x", "--yes"], "mailbox bury"),
    ] {
        let (done, _, err) = loom(
            &with(cmd, &["--url", &base], false)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        assert!(
            !done
                && err.contains(&format!("`loom {name}` works on the store itself"))
                && err.contains("give --store"),
            "{err}"
        );
    }
    let out = tempfile::tempdir().expect("temp dir");
    let file = out.path().join("x.export");
    let (done, _, err) = loom(&["export", "--url", &base, "--out", file.to_str().unwrap()]);
    assert!(
        !done && err.contains("`loom export` works on the store itself"),
        "{err}"
    );
    // Errors of the admin API arrive as the command's own.
    let (done, _, err) = loom(&["journal", "show", "nobody/x", "--url", &base]);
    assert!(!done && err.contains("no journal for nobody/x"), "{err}");
    let (done, _, err) = loom(&["parked", "unpark", "counter/a", "--url", &base]);
    assert!(
        !done && err.contains("only reads"),
        "a read-only serve unparked: {err}"
    );
    let (done, _, err) = loom(&["deadletters", "requeue", "1", "--url", &base, "--json"]);
    let refusal: serde_json::Value = serde_json::from_str(err.trim()).expect("a JSON error");
    assert!(
        !done && refusal["error"].as_str().unwrap().contains("only reads"),
        "{err}"
    );
    // --url and --store together, and addresses that are not an admin API.
    let (done, _, err) = loom(&["journal", "ls", "--url", &base, "--store", store]);
    assert!(
        !done && err.contains("give --store or --url, not both"),
        "{err}"
    );
    let (done, _, err) = loom(&["journal", "ls", "--url", "ftp://example.com"]);
    assert!(
        !done && err.contains("expected an http:// or https://"),
        "{err}"
    );
    let (done, _, err) = loom(&["journal", "ls", "--url", &format!("{base}/nothing-here")]);
    assert!(
        !done && err.contains("is --url the address of a Loom"),
        "{err}"
    );
    let port = free_port();
    let (done, _, err) = loom(&[
        "journal",
        "ls",
        "--url",
        &format!("http://127.0.0.1:{port}"),
    ]);
    assert!(!done && err.contains("cannot reach the admin API"), "{err}");
    stop(server);
    // Stopped: LOOM_URL in the environment yields to --store on the command line.
    let (done, from_flag, err) =
        loom_with(&["journal", "ls", "--store", store], &[("LOOM_URL", &base)]);
    assert!(done && from_flag == over_url[0], "{err}");

    let mut i = 0;
    for cmd in READS {
        for json in [false, true] {
            let direct = run(&with(cmd, &["--store", store], json));
            assert_eq!(
                over_url[i], direct,
                "loom {cmd:?} (json: {json}) differs over --url"
            );
            // An empty list is no JSON lines; in text it is a sentence.
            assert!(json || !direct.is_empty(), "loom {cmd:?} printed nothing");
            i += 1;
        }
    }
}

#[test]
fn writes_over_url_need_the_token_and_reach_the_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (keyed, key) = fixture(dir.path());
    let store = dir.path().to_str().expect("utf-8 path");
    let (server, base) = serve(store, &["--allow-writes"], Some("s3cret"));
    let token = [("LOOM_TOKEN", "s3cret")];
    let url = ["--url", base.as_str()];
    let write = |cmd: &[&str], env: &[(&str, &str)]| {
        let mut args = cmd.to_vec();
        args.extend(url);
        loom_with(&args, env)
    };

    let dead = json_lines(&ok(&["deadletters", "ls", "--json", "--url", &base]));
    assert_eq!(dead.len(), 2, "{dead:?}");
    let first = dead[0]["id"].to_string();
    let (done, _, err) = write(&["deadletters", "requeue", &first], &[]);
    assert!(
        !done && err.contains("bearer token") && err.contains("set LOOM_TOKEN"),
        "requeued without the token: {err}"
    );
    let (done, _, err) = write(
        &["deadletters", "requeue", &first],
        &[("LOOM_TOKEN", "wrong")],
    );
    assert!(!done && err.contains("bearer token"), "{err}");
    let (done, said, err) = write(&["deadletters", "requeue", &first], &token);
    assert!(done && said.contains("is back in its mailbox"), "{err}");
    // `loom serve`'s /health and /metrics read the store: the parked actor counted, then not.
    let scrape = || {
        let rt = tokio::runtime::Runtime::new().expect("tokio");
        rt.block_on(async {
            let health = reqwest::get(format!("{base}/health"))
                .await
                .expect("health");
            assert_eq!(health.status().as_u16(), 200);
            let metrics = reqwest::get(format!("{base}/metrics"))
                .await
                .expect("metrics");
            metrics.text().await.expect("scrape")
        })
    };
    let before = scrape();
    let line = |text: &str, want: &str| text.lines().any(|l| l == want);
    assert!(line(&before, "loom_store_healthy 1"), "{before}");
    assert!(
        line(&before, r#"loom_parked_actors{kind="inbox"} 1"#),
        "{before}"
    );
    let (done, said, err) = write(&["parked", "unpark", "inbox/parked"], &token);
    assert!(done && said.contains("inbox/parked is unparked"), "{err}");
    let after = scrape();
    assert!(
        line(&after, r#"loom_parked_actors{kind="inbox"} 0"#),
        "{after}"
    );
    let (done, _, err) = write(&["parked", "unpark", "inbox/parked"], &token);
    assert!(!done && err.contains("is not parked"), "{err}");
    let waiting = json_lines(&ok(&[
        "mailbox", "show", "inbox/x", "--json", "--url", &base,
    ]));
    let due = waiting[0]["message_id"].as_str().expect("an id").to_owned();
    let (done, said, err) = write(&["mailbox", "cancel", "inbox/x", "--message", &due], &token);
    assert!(done && said.contains("is asked to be cancelled"), "{err}");
    let (done, _, err) = write(
        &["mailbox", "cancel", "inbox/x", "--key", "never-sent"],
        &token,
    );
    assert!(
        !done && err.contains("has no such message waiting"),
        "{err}"
    );
    let (done, said, err) = write(&["deadletters", "purge", "--yes", "--json"], &token);
    assert!(done, "{err}");
    let purged: serde_json::Value = serde_json::from_str(said.trim()).expect("json");
    assert_eq!(purged["purged"], 1, "{purged}");
    assert_eq!(purged["any_left"], false, "{purged}");
    stop(server);

    // All of it is in the store.
    assert_eq!(
        ok(&["deadletters", "ls", "--store", store]).trim(),
        "no dead letters"
    );
    assert_eq!(
        ok(&["parked", "ls", "--store", store]).trim(),
        "no actor is parked"
    );
    let shown = json_lines(&ok(&[
        "mailbox", "show", "inbox/x", "--json", "--store", store,
    ]));
    assert!(shown.iter().all(|w| w["cancelling"] == true), "{shown:?}");
    let back = json_lines(&ok(&[
        "mailbox",
        "show",
        "inbox/dead",
        "--json",
        "--store",
        store,
    ]));
    assert_eq!(
        back.len(),
        1,
        "the requeued dead letter waits again: {back:?}"
    );
    // The purge settled the key its sender still held: asking again learns that it failed.
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let record = rt.block_on(async {
        let store = EmbeddedStore::open(dir.path()).expect("open");
        store.lookup(&keyed, &key).await.unwrap()
    });
    match record {
        Some(Reservation::Completed(v)) => {
            assert!(
                v.to_string().contains("purged from the dead letters"),
                "{v}"
            )
        }
        other => panic!("the key was left {other:?}"),
    }
}
