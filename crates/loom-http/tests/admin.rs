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
    let resp = app
        .clone()
        .oneshot(r.body(Body::empty()).expect("request"))
        .await
        .expect("infallible");
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
