//! The admin API over a store, through the router: paging, journals, the state at any seq and
//! the diff between two, mailboxes, dead letters and the rules on writes.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use loom_core::runtime::{Actor, Context, Rejected, Runtime, state_at};
use loom_core::{ActorId, Envelope};
use loom_http::AdminOptions;
use serde_json::{Value, json};
use tower::ServiceExt;

/// A list of words; each message appends one.
struct Words;

impl Actor for Words {
    const KIND: &'static str = "words";
    type State = Vec<String>;
    type Message = String;
    type Reply = usize;

    async fn handle(
        &self,
        words: &mut Vec<String>,
        _: &mut Context<'_>,
        w: String,
    ) -> Result<usize, Rejected> {
        words.push(w);
        Ok(words.len())
    }
}

async fn call(app: &Router, method: &str, uri: &str, token: Option<&str>) -> (StatusCode, Value) {
    let mut r = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        r = r.header("authorization", format!("Bearer {t}"));
    }
    answer(app, r.body(Body::empty()).expect("request")).await
}

/// The status and JSON body `app` answers `req` with.
async fn answer(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let uri = req.uri().to_string();
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{uri}: not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    (status, v)
}

#[tokio::test]
async fn journals_states_and_diffs_are_read_a_page_at_a_time() {
    let rt = Runtime::builder()
        .memory()
        .register_actor(Words)
        .start()
        .await
        .expect("start");
    for key in ["a", "b", "c"] {
        rt.actor::<Words>(key)
            .expect("id")
            .ask("first".into())
            .await
            .expect("ask");
    }
    let b = rt.actor::<Words>("b").expect("id");
    let after_first = rt.store().info(b.id()).await.expect("info").highest;
    b.ask("second".into()).await.expect("ask");
    b.ask("third".into()).await.expect("ask");
    let highest = rt.store().info(b.id()).await.expect("info").highest;
    let app = loom_http::admin(rt.store().clone(), AdminOptions::default());

    // Actors, two to a page.
    let (s, p1) = call(&app, "GET", "/api/actors?limit=2", None).await;
    assert_eq!(s, StatusCode::OK, "{p1}");
    let ids: Vec<&str> = p1["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|a| a["actor"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["words/a", "words/b"]);
    assert_eq!(p1["next"], "words/b");
    let (_, p2) = call(&app, "GET", "/api/actors?limit=2&after=words/b", None).await;
    assert_eq!(p2["items"][0]["actor"], "words/c");
    assert_eq!(p2["next"], Value::Null);

    // A search: a key's start (the exact id included), a whole kind a page at a time, none.
    let found = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|a| a["actor"].as_str().expect("id").to_owned())
            .collect()
    };
    let (s, one) = call(&app, "GET", "/api/actors?prefix=words/b", None).await;
    assert_eq!(
        (s, found(&one)),
        (StatusCode::OK, vec!["words/b".to_owned()])
    );
    assert_eq!(one["next"], Value::Null);
    let (_, k1) = call(&app, "GET", "/api/actors?prefix=words&limit=2", None).await;
    assert_eq!(found(&k1), ["words/a", "words/b"]);
    assert_eq!(k1["next"], "words/b");
    let (_, k2) = call(
        &app,
        "GET",
        "/api/actors?prefix=words&limit=2&after=words/b",
        None,
    )
    .await;
    assert_eq!(found(&k2), ["words/c"]);
    assert_eq!(k2["next"], Value::Null);
    let (_, exact) = call(&app, "GET", "/api/actors?prefix=words/a&limit=1", None).await;
    assert_eq!(found(&exact), ["words/a"]);
    let (_, early) = call(&app, "GET", "/api/actors?prefix=words/b&after=a/x", None).await;
    assert_eq!(found(&early), ["words/b"], "an after before the matches");
    let (_, none) = call(&app, "GET", "/api/actors?prefix=word", None).await;
    assert!(found(&none).is_empty(), "a kind is matched whole: {none}");
    let (s, bad) = call(&app, "GET", "/api/actors?prefix=no%20kind", None).await;
    assert_eq!(
        (s, bad["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("bad_key"))
    );

    // The journal, a page at a time, each entry decoded.
    let (_, j) = call(&app, "GET", "/api/actors/words/b/journal?limit=3", None).await;
    assert_eq!(j["items"].as_array().expect("items").len(), 3);
    assert_eq!(j["items"][0]["kind"]["type"], "invoked");
    assert_eq!(j["next"], 4);

    // The state at any seq is the one rebuilt from the store, and the diff says what changed.
    for seq in [after_first, highest] {
        let (s, at) = call(
            &app,
            "GET",
            &format!("/api/actors/words/b/state?seq={seq}"),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{at}");
        let expected = state_at(&**rt.store(), b.id(), seq)
            .await
            .expect("state_at");
        assert_eq!(at["state"], expected.state);
    }
    let (_, at) = call(
        &app,
        "GET",
        &format!("/api/actors/words/b/state?seq={after_first}"),
        None,
    )
    .await;
    assert_eq!(at["state"], json!(["first"]));
    let (_, now) = call(&app, "GET", "/api/actors/words/b/state", None).await;
    assert_eq!(now["state"], json!(["first", "second", "third"]));
    let (_, d) = call(
        &app,
        "GET",
        &format!("/api/actors/words/b/diff?from={after_first}&to={highest}"),
        None,
    )
    .await;
    assert_eq!(d["patch"].as_array().expect("patch").len(), 2, "{d}");
    let (s, e) = call(
        &app,
        "GET",
        &format!("/api/actors/words/b/state?seq={}", highest + 1),
        None,
    )
    .await;
    assert_eq!(
        (s, &e["error"]),
        (StatusCode::NOT_FOUND, &json!("not_found")),
        "{e}"
    );

    // Bad input is a typed error.
    for (uri, code) in [
        ("/api/actors?limit=0", "bad_request"),
        ("/api/actors?limit=100000", "bad_request"),
        ("/api/actors?after=nokey", "bad_key"),
        ("/api/actors/words/b/journal?colour=red", "bad_request"),
        ("/api/actors/words/b/diff?from=1", "bad_request"),
        ("/api/deadletters?after=x", "bad_request"),
    ] {
        let (s, e) = call(&app, "GET", uri, None).await;
        assert_eq!(
            (s, &e["error"]),
            (StatusCode::BAD_REQUEST, &json!(code)),
            "{uri}: {e}"
        );
    }
    rt.shutdown().await;
}

/// A page of a journal of large entries ends once it holds about `MAX_PAGE_BYTES`, with the
/// seq to go on from, and the pages together are the whole journal (*before*: 500 entries
/// of up to 4 MiB each, two gigabytes, were built into one answer).
#[tokio::test]
async fn a_journal_of_large_entries_is_paged_by_bytes_too() {
    use loom_core::{Entry, EntryKind, JournalStore};
    let store = loom_core::EmbeddedStore::in_memory().expect("store");
    let a = ActorId::new("big", "a").expect("id");
    let mb = "x".repeat(1024 * 1024);
    for s in 1..=20 {
        let e = Entry::new(s, EntryKind::Completed { reply: json!(mb) });
        store.append(&a, s, &[e]).await.expect("append");
    }
    let app = loom_http::admin(std::sync::Arc::new(store), AdminOptions::default());
    let (mut from, mut seqs, mut pages) = (1, Vec::new(), 0);
    loop {
        let uri = format!("/api/actors/big/a/journal?from={from}&limit=500");
        let (s, page) = call(&app, "GET", &uri, None).await;
        assert_eq!(s, StatusCode::OK);
        let items = page["items"].as_array().expect("items");
        let bytes = page["items"].to_string().len();
        assert!(
            bytes <= loom_http::MAX_PAGE_BYTES + 2 * mb.len(),
            "a page of {bytes} bytes"
        );
        seqs.extend(items.iter().map(|e| e["seq"].as_u64().expect("seq")));
        pages += 1;
        match page["next"].as_u64() {
            Some(next) => from = next,
            None => break,
        }
    }
    assert_eq!(seqs, (1..=20).collect::<Vec<u64>>());
    assert!(pages >= 3, "{pages} pages for 20 MiB");
    // As summaries (Studio's timeline): one small page, each entry's seq, time and type.
    let (s, page) = call(&app, "GET", "/api/actors/big/a/journal?summary=true", None).await;
    assert_eq!(s, StatusCode::OK);
    let items = page["items"].as_array().expect("items");
    assert_eq!(items.len(), 20);
    assert_eq!(
        items[0]["kind"],
        json!({ "type": "completed" }),
        "{}",
        items[0]
    );
    assert!(
        items[0]["at"].is_number() || items[0]["at"].is_string(),
        "{}",
        items[0]
    );
    assert!(
        page.to_string().len() < 20_000,
        "{} bytes",
        page.to_string().len()
    );
}

/// A page of an actor's waiting messages, or of dead letters, each close to the message size
/// limit, ends once it holds about `MAX_PAGE_BYTES`, with the position or id to go on from,
/// and the pages together hold each message once (*before*: `limit=500` read 500 whole
/// messages, up to half a GiB and more once decoded, into one answer, on an open read).
#[tokio::test]
async fn waiting_messages_and_dead_letters_of_a_mib_each_are_paged_by_bytes_too() {
    use loom_core::Mailbox;
    let store = std::sync::Arc::new(loom_core::EmbeddedStore::in_memory().expect("store"));
    let a = ActorId::new("big", "m").expect("id");
    let pad = "x".repeat(1000 * 1000);
    for i in 0..24 {
        let e = Envelope::new(a.clone(), json!({ "i": i, "pad": pad }));
        store.enqueue(&e, None).await.expect("enqueue");
    }
    let opts = loom_core::LeaseOptions::default();
    for _ in 0..12 {
        let d = store
            .lease(&a, opts)
            .await
            .expect("lease")
            .expect("a message");
        store
            .dead_letter(&d.receipt, "too big to live")
            .await
            .expect("bury");
    }
    let app = loom_http::admin(store.clone(), AdminOptions::default());
    for (path, key, n) in [
        ("/api/actors/big/m/mailbox", "position", 12),
        ("/api/deadletters", "id", 12),
    ] {
        let (mut after, mut seen, mut pages) = (None::<u64>, Vec::new(), 0);
        loop {
            let uri = match after {
                Some(a) => format!("{path}?limit=500&after={a}"),
                None => format!("{path}?limit=500"),
            };
            let (s, page) = call(&app, "GET", &uri, None).await;
            assert_eq!(s, StatusCode::OK, "{uri}: {page}");
            let items = page["items"].as_array().expect("items");
            let bytes = page["items"].to_string().len();
            assert!(
                bytes <= loom_http::MAX_PAGE_BYTES + 2 * pad.len(),
                "{uri}: a page of {bytes} bytes"
            );
            seen.extend(items.iter().map(|m| m[key].as_u64().expect("cursor")));
            pages += 1;
            match page["next"].as_u64() {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!((seen.len(), sorted.len()), (n, n), "{path}: {seen:?}");
        assert!(pages >= 2, "{path}: {pages} pages for {n} MB");
    }
    // Small messages still come in one page of the limit asked for.
    let small = ActorId::new("small", "s").expect("id");
    for i in 0..30 {
        store
            .enqueue(&Envelope::new(small.clone(), json!(i)), None)
            .await
            .expect("enqueue");
    }
    let (_, page) = call(&app, "GET", "/api/actors/small/s/mailbox?limit=30", None).await;
    assert_eq!(page["items"].as_array().expect("items").len(), 30);
    let (_, page) = call(&app, "GET", "/api/actors/small/s/mailbox?limit=500", None).await;
    assert_eq!(page["items"].as_array().expect("items").len(), 30);
    assert_eq!(page["next"], Value::Null);
}

#[tokio::test]
async fn a_dead_letter_is_requeued_only_with_writes_allowed_and_the_token() {
    let rt = Runtime::builder()
        .memory()
        .register_actor(Words)
        .start()
        .await
        .expect("start");
    // A message that is not a `Words` message: dead-lettered as malformed.
    let id = ActorId::new("words", "z").expect("id");
    rt.store()
        .enqueue(&Envelope::new(id.clone(), json!({ "not": "a word" })), None)
        .await
        .expect("enqueue");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let dead = loop {
        let d = rt
            .store()
            .dead_letters(None, 10)
            .await
            .expect("dead letters");
        if let Some(d) = d.first() {
            break d.id;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let read_only = loom_http::admin(rt.store().clone(), AdminOptions::default());
    let (s, list) = call(&read_only, "GET", "/api/deadletters", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["items"][0]["id"], dead);
    let requeue = format!("/api/deadletters/{dead}/requeue");
    let (s, e) = call(&read_only, "POST", &requeue, Some("tok")).await;
    assert_eq!(
        (s, &e["error"]),
        (StatusCode::FORBIDDEN, &json!("writes_disabled")),
        "{e}"
    );

    let writable = loom_http::admin(
        rt.store().clone(),
        AdminOptions {
            allow_writes: true,
            token: Some("tok".into()),
            ..AdminOptions::default()
        },
    );
    for wrong in [None, Some("nope")] {
        let (s, e) = call(&writable, "POST", &requeue, wrong).await;
        assert_eq!(
            (s, &e["error"]),
            (StatusCode::UNAUTHORIZED, &json!("unauthorized")),
            "{e}"
        );
    }
    assert_eq!(
        rt.store().dead_letters(None, 10).await.expect("list").len(),
        1,
        "a refused write wrote"
    );
    let (s, r) = call(&writable, "POST", &requeue, Some("tok")).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert!(
        rt.store()
            .dead_letters(None, 10)
            .await
            .expect("list")
            .iter()
            .all(|d| d.id != dead),
        "still a dead letter"
    );
    // Only the hosts it serves, when it is told them.
    let local = loom_http::admin(
        rt.store().clone(),
        AdminOptions {
            hosts: vec!["localhost:7070".into()],
            ..AdminOptions::default()
        },
    );
    for (host, status) in [
        ("localhost:7070", StatusCode::OK),
        ("rebound.example:7070", StatusCode::FORBIDDEN),
    ] {
        let r = Request::get("/api/deadletters")
            .header("host", host)
            .body(Body::empty())
            .expect("request");
        let resp = local.clone().oneshot(r).await.expect("infallible");
        assert_eq!(resp.status(), status, "{host}");
        assert_eq!(resp.headers()["x-frame-options"], "DENY");
    }
    let (s, e) = call(
        &writable,
        "POST",
        &format!("/api/deadletters/{dead}/purge"),
        Some("tok"),
    )
    .await;
    assert_eq!(
        (s, &e["error"]),
        (StatusCode::NOT_FOUND, &json!("not_found")),
        "{e}"
    );
    rt.shutdown().await;
}

/// `state_at` at the edges, on a journal written by hand: before and at a snapshot, inside an
/// invocation, past the end, below the trim point, an unknown actor, a deleted journal.
#[tokio::test]
async fn the_state_at_a_seq_at_the_edges_of_a_journal() {
    use loom_core::runtime::StateAtError;
    use loom_core::{EmbeddedStore, Entry, EntryKind, JournalStore, MessageId, Snapshot};

    let store = EmbeddedStore::in_memory().expect("store");
    let a = ActorId::new("ledger", "l1").expect("id");
    // Invocations setting the state to 1, 2, 3, 4: seqs 1-3, 4-6, 7-9, 10-12.
    let mut entries = Vec::new();
    for n in 1..=4u64 {
        let base = (n - 1) * 3;
        let patch: json_patch::Patch =
            serde_json::from_value(json!([{ "op": "replace", "path": "", "value": n }]))
                .expect("patch");
        entries.push(Entry::new(
            base + 1,
            EntryKind::Invoked {
                message_id: MessageId::new(),
                payload: json!(n),
                idempotency_key: None,
                requeued_from: None,
            },
        ));
        entries.push(Entry::new(base + 2, EntryKind::StatePatched { patch }));
        entries.push(Entry::new(
            base + 3,
            EntryKind::Completed { reply: json!(n) },
        ));
    }
    store.append(&a, 1, &entries).await.expect("append");
    let at = |seq| {
        let store = &store;
        let a = &a;
        async move { state_at(store, a, seq).await }
    };
    assert_eq!(
        at(1).await.expect("seq 1").state,
        Value::Null,
        "inside the first invocation"
    );
    assert_eq!(at(2).await.expect("seq 2").state, json!(1));
    assert_eq!(at(7).await.expect("seq 7").state, json!(2));
    assert_eq!(at(12).await.expect("seq 12").state, json!(4));
    assert!(matches!(
        at(13).await,
        Err(StateAtError::Beyond { highest: 12, .. })
    ));

    // A snapshot at 6 (state 2), the journal trimmed through it.
    let body = json!({ "state": 2, "recent": [] });
    store
        .save_snapshot(&a, &Snapshot::new(6, body), 2)
        .await
        .expect("snapshot");
    store.trim(&a, 6).await.expect("trim");
    let s6 = at(6).await.expect("at the snapshot");
    assert_eq!(
        (s6.state.clone(), s6.snapshot, s6.replayed),
        (json!(2), Some(6), 0)
    );
    let s9 = at(9).await.expect("after it");
    assert_eq!((s9.state.clone(), s9.snapshot), (json!(3), Some(6)));
    assert!(
        matches!(
            at(5).await,
            Err(StateAtError::Trimmed {
                earliest: 6,
                trimmed_through: 6,
                ..
            })
        ),
        "below the trim point"
    );

    let unknown = ActorId::new("ledger", "nobody").expect("id");
    assert!(matches!(
        state_at(&store, &unknown, 1).await,
        Err(StateAtError::NoJournal(_))
    ));
    store.delete(&a, None).await.expect("delete");
    assert!(
        matches!(at(12).await, Err(StateAtError::Deleted { highest: 12, .. })),
        "{:?}",
        at(12).await
    );
}

async fn post_json(app: &Router, uri: &str, token: &str, body: &str) -> (StatusCode, Value) {
    let r = Request::builder()
        .method("POST")
        .uri(uri)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .expect("request");
    answer(app, r).await
}

/// `GET /api/mailboxes` pages through one kind's mailboxes past those of other kinds; a cancel
/// and a bulk purge name what they act on, or are refused with a typed error.
#[tokio::test]
async fn mailboxes_page_by_kind_and_bulk_writes_check_their_bodies() {
    let store = loom_core::EmbeddedStore::in_memory().expect("store");
    let store: std::sync::Arc<dyn loom_core::Store> = std::sync::Arc::new(store);
    // Kinds interleaved in id order: a/0, b/0, a/1, … sort as a/*, then b/*; five of each.
    for i in 0..5 {
        for kind in ["a", "b"] {
            let to = ActorId::new(kind, format!("{i}")).expect("id");
            store
                .enqueue(&Envelope::new(to, json!(i)), None)
                .await
                .expect("enqueue");
        }
    }
    let app = loom_http::admin(
        store.clone(),
        AdminOptions {
            allow_writes: true,
            token: Some("t".into()),
            hosts: Vec::new(),
        },
    );
    let mut seen = Vec::new();
    let mut uri = "/api/mailboxes?kind=b&limit=2".to_owned();
    loop {
        let (s, page) = call(&app, "GET", &uri, None).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        for m in page["items"].as_array().expect("items") {
            assert_eq!(m["pending"], 1, "{m}");
            assert_eq!(m["parked"], false, "{m}");
            seen.push(m["actor"].as_str().expect("actor").to_owned());
        }
        match page["next"].as_str() {
            Some(next) => uri = format!("/api/mailboxes?kind=b&limit=2&after={next}"),
            None => break,
        }
    }
    assert_eq!(seen, ["b/0", "b/1", "b/2", "b/3", "b/4"]);
    let (s, all) = call(&app, "GET", "/api/mailboxes?limit=500", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(all["items"].as_array().expect("items").len(), 10, "{all}");
    assert_eq!(all["next"], Value::Null);

    // Cancel: by an unknown id is not found; a body naming nothing is refused.
    let id = loom_core::MessageId::new();
    let (s, v) = post_json(
        &app,
        "/api/actors/a/0/cancel",
        "t",
        &json!({"message": id}).to_string(),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found")),
        "{v}"
    );
    let (s, v) = post_json(&app, "/api/actors/a/0/cancel", "t", r#"{"id": 1}"#).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("bad_message")),
        "{v}"
    );
    let (s, v) = post_json(&app, "/api/actors/a/0/cancel", "t", "not json").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // Without `Content-Type: application/json`: 415, as the ingress answers it (*before*: 400).
    for path in ["/api/actors/a/0/cancel", "/api/deadletters/purge"] {
        let req = Request::builder()
            .method("POST")
            .uri(path)
            .header("authorization", "Bearer t")
            .header("content-type", "text/plain")
            .body(Body::from(r#"{"all": true}"#))
            .expect("request");
        let (s, v) = answer(&app, req).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, Some("not_json")),
            "{path}: {v}"
        );
    }

    // Bulk purge: exactly one of before_ms, ids, all (true); nothing purged when none matches.
    for bad in [
        r#"{}"#,
        r#"{"all": false}"#,
        r#"{"before_ms": 1, "ids": []}"#,
        r#"{"every": true}"#,
    ] {
        let (s, v) = post_json(&app, "/api/deadletters/purge", "t", bad).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("bad_message")),
            "{bad}: {v}"
        );
    }
    let (s, v) = post_json(&app, "/api/deadletters/purge", "t", r#"{"before_ms": 1}"#).await;
    assert_eq!((s, &v), (StatusCode::OK, &json!({"purged": 0})));
    let (s, v) = post_json(&app, "/api/deadletters/purge", "wrong", r#"{"all": true}"#).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
}
