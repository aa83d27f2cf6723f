//! The ingress as a client meets it: each route through the router (no socket), with good and
//! bad requests, idempotency, tokens, limits and trace context.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use loom_core::ActorId;
use loom_core::runtime::{Actor, Context, Rejected, Runtime, StepError};
use loom_http::Options;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tower::ServiceExt;

/// A ticket counter: counts what it is given, refuses negative numbers, and can wait for an
/// event.
struct Tickets;

#[derive(Debug, Serialize, Deserialize)]
enum Msg {
    Add(i64),
    WaitFor(String),
}

impl Actor for Tickets {
    const KIND: &'static str = "tickets";
    type State = i64;
    type Message = Msg;
    type Reply = Value;

    async fn handle(
        &self,
        n: &mut i64,
        ctx: &mut Context<'_>,
        msg: Msg,
    ) -> Result<Value, Rejected> {
        match msg {
            Msg::Add(k) if k < 0 => Err(Rejected::with_value(
                "negative",
                &json!({ "given": k, "min": 0 }),
            )),
            Msg::Add(k) => {
                *n += k;
                Ok(json!(*n))
            }
            Msg::WaitFor(name) => match ctx.wait_event::<Value>(&name, None).await {
                Ok(v) => Ok(json!({ "got": v })),
                Err(StepError::Cancelled) => Err(Rejected::cancelled("called off")),
                Err(e) => Err(e.into()),
            },
        }
    }
}

async fn start() -> Runtime {
    Runtime::builder()
        .memory()
        .register_actor(Tickets)
        .start()
        .await
        .expect("start")
}

/// Sends `req` through `app`; the status and the body as JSON (`null` if empty).
async fn call(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
    };
    (status, body)
}

fn post(uri: &str) -> axum::http::request::Builder {
    Request::post(uri).header("content-type", "application/json")
}

fn req(uri: &str, body: &str) -> Request<Body> {
    post(uri)
        .body(Body::from(body.to_owned()))
        .expect("request")
}

#[tokio::test]
async fn ask_send_and_events_reach_the_actor_once_per_key() {
    let rt = start().await;
    let app = loom_http::router(rt.clone(), Options::default());

    let (s, b) = call(&app, req("/actors/tickets/t1/ask", r#"{"Add": 2}"#)).await;
    assert_eq!((s, b), (StatusCode::OK, json!(2)));

    // A send with a key, retried: applied once.
    for (i, expected) in [(0, StatusCode::ACCEPTED), (1, StatusCode::OK)] {
        let r = post("/actors/tickets/t1/send")
            .header("idempotency-key", "add-three")
            .body(Body::from(r#"{"Add": 3}"#))
            .expect("request");
        let (s, b) = call(&app, r).await;
        assert_eq!(s, expected, "send {i}: {b}");
        assert_eq!(b["duplicate"], json!(i == 1), "{b}");
        if i == 0 {
            assert!(b["message_id"].is_string(), "{b}");
        }
    }
    // An ask with a key, retried: the recorded reply, applied once.
    for _ in 0..2 {
        let r = post("/actors/tickets/t1/ask")
            .header("idempotency-key", "add-ten")
            .body(Body::from(r#"{"Add": 10}"#))
            .expect("request");
        assert_eq!(call(&app, r).await, (StatusCode::OK, json!(15)));
    }
    let (_, b) = call(&app, req("/actors/tickets/t1/ask", r#"{"Add": 0}"#)).await;
    assert_eq!(
        b,
        json!(15),
        "the keyed send and ask were applied once each"
    );

    // An event reaches the invocation that waits for it; the same key again is one event.
    let waiting = tokio::spawn({
        let app = app.clone();
        async move {
            call(
                &app,
                req("/actors/tickets/t2/ask", r#"{"WaitFor": "paid"}"#),
            )
            .await
        }
    });
    for (i, expected) in [(0, StatusCode::ACCEPTED), (1, StatusCode::OK)] {
        let r = post("/actors/tickets/t2/events/paid")
            .header("idempotency-key", "payment-77")
            .body(Body::from(r#"{"amount": 5}"#))
            .expect("request");
        let (s, b) = call(&app, r).await;
        assert_eq!(s, expected, "event {i}: {b}");
    }
    let (s, b) = waiting.await.expect("join");
    assert_eq!((s, b), (StatusCode::OK, json!({ "got": { "amount": 5 } })));
    rt.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_typed_errors_and_send_nothing() {
    let rt = start().await;
    let app = loom_http::router(
        rt.clone(),
        Options {
            max_body_bytes: 1024,
            ..Options::default()
        },
    );
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (
            req("/actors/tickets/t1/ask", "{not json"),
            StatusCode::BAD_REQUEST,
            "bad_message",
        ),
        (
            req("/actors/tickets/t1/send", r#"{"Subtract": 1}"#),
            StatusCode::BAD_REQUEST,
            "bad_message",
        ),
        (
            req("/actors/tickets/t1/ask", ""),
            StatusCode::BAD_REQUEST,
            "bad_message",
        ),
        (
            req("/actors/nobody/t1/ask", r#"{"Add": 1}"#),
            StatusCode::NOT_FOUND,
            "unknown_kind",
        ),
        (
            req(
                &format!("/actors/tickets/{}/ask", "k".repeat(300)),
                r#"{"Add": 1}"#,
            ),
            StatusCode::BAD_REQUEST,
            "bad_key",
        ),
        (
            req(
                "/actors/tickets/t1/send",
                &format!(r#"{{"Add": 1, "pad": "{}"}}"#, "x".repeat(2000)),
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
        ),
        (
            // Nested deeper than a stored message may be (its entry nests it two levels
            // further down): refused before it is parsed, not stored and then buried as a
            // damaged frame.
            req(
                "/actors/tickets/t1/send",
                &format!(
                    "{}1{}",
                    "[".repeat(loom_core::limits::MAX_JSON_DEPTH - 1),
                    "]".repeat(loom_core::limits::MAX_JSON_DEPTH - 1)
                ),
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
        ),
        (
            // A form post, as any web page can make a browser send: refused.
            Request::post("/actors/tickets/t1/send")
                .header("content-type", "text/plain")
                .body(Body::from(r#"{"Add": 1}"#))
                .expect("request"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not_json",
        ),
        (
            Request::post("/actors/tickets/t1/send")
                .body(Body::from(r#"{"Add": 1}"#))
                .expect("request"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not_json",
        ),
        (
            req("/actors/tickets/t1/ask?timeout_ms=0", r#"{"Add": 1}"#),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            req("/actors/tickets/t1/ask?colour=red", r#"{"Add": 1}"#),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            req("/actors/tickets/t1/ask?delay_ms=5", r#"{"Add": 1}"#),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        // A delay past a century: before, it saturated to "never" and was taken (202).
        (
            req(
                &format!("/actors/tickets/t1/send?delay_ms={}", u64::MAX),
                r#"{"Add": 1}"#,
            ),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        // An event name no wait could receive (over 1 024 bytes): before, taken (202).
        (
            req(
                &format!("/actors/tickets/t1/events/{}", "n".repeat(1025)),
                r#"{"n": 1}"#,
            ),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            post("/actors/tickets/t1/send")
                .header("idempotency-key", "")
                .body(Body::from(r#"{"Add": 1}"#))
                .expect("request"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
    ];
    for (r, status, code) in cases {
        let what = r.uri().to_string();
        let (s, b) = call(&app, r).await;
        assert_eq!(s, status, "{what}: {b}");
        assert_eq!(b["error"], json!(code), "{what}: {b}");
        assert!(
            b["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {b}"
        );
    }
    // Nothing of the above reached a mailbox or ran.
    let id = ActorId::new("tickets", "t1").expect("id");
    assert_eq!(rt.store().pending(&id).await.expect("pending"), 0);
    assert_eq!(rt.metrics().invocations, 0);

    // Refused by the handler: 422 with its reason and value; the state unchanged.
    let (s, b) = call(&app, req("/actors/tickets/t1/ask", r#"{"Add": -4}"#)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(b["error"], "rejected");
    assert_eq!(b["reason"], "negative");
    assert_eq!(b["value"], json!({ "given": -4, "min": 0 }));

    // No reply in time: 504, and the message still runs.
    let (s, b) = call(
        &app,
        req(
            "/actors/tickets/t3/ask?timeout_ms=300",
            r#"{"WaitFor": "never"}"#,
        ),
    )
    .await;
    assert_eq!(
        (s, &b["error"]),
        (StatusCode::GATEWAY_TIMEOUT, &json!("timeout")),
        "{b}"
    );
    rt.shutdown().await;
}

/// An ask that times out leaves its message to run. Without a key of the caller's, the client
/// would have nothing to get the reply with, and asking again would send the message twice;
/// the `504` names the key it went under (made up by the ingress), and asking again with it
/// answers the first run's reply. A caller's own key is named back as it was given.
#[tokio::test]
async fn a_timed_out_ask_names_the_key_to_ask_again_with() {
    let rt = start().await;
    let app = loom_http::router(rt.clone(), Options::default());
    let ask = |key: Option<&str>| {
        let mut r = post("/actors/tickets/t9/ask?timeout_ms=300");
        if let Some(k) = key {
            r = r.header("idempotency-key", k);
        }
        r.body(Body::from(r#"{"WaitFor": "go"}"#)).expect("request")
    };
    let resp = app.clone().oneshot(ask(None)).await.expect("infallible");
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    let header = resp.headers()["idempotency-key"]
        .to_str()
        .expect("a header value")
        .to_owned();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let body: Value = serde_json::from_slice(&bytes).expect("JSON");
    assert_eq!(body["error"], "timeout", "{body}");
    assert_eq!(body["idempotency_key"], json!(header), "{body}");
    assert!(header.starts_with("ask-"), "{header}");

    // The message waits for its event; the event comes, and the same key gets its reply.
    let (s, b) = call(&app, req("/actors/tickets/t9/events/go", r#"{"n": 7}"#)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let r = post("/actors/tickets/t9/ask?timeout_ms=10000")
        .header("idempotency-key", &header)
        .body(Body::from(r#"{"WaitFor": "go"}"#))
        .expect("request");
    assert_eq!(
        call(&app, r).await,
        (StatusCode::OK, json!({ "got": { "n": 7 } }))
    );
    // Sent once: no second message waits for another "go".
    let t9 = ActorId::new("tickets", "t9").expect("id");
    assert_eq!(rt.store().pending(&t9).await.expect("pending"), 0);

    let (s, b) = call(&app, ask(Some("mine-1"))).await;
    assert_eq!(
        (s, &b["idempotency_key"]),
        (StatusCode::GATEWAY_TIMEOUT, &json!("mine-1")),
        "{b}"
    );
    rt.shutdown().await;
}

#[tokio::test]
async fn a_token_is_required_when_one_is_set() {
    let rt = start().await;
    let app = loom_http::router(
        rt.clone(),
        Options {
            token: Some("s3cret-token".into()),
            ..Options::default()
        },
    );
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("s3cret-token"),
        Some("Bearer s3cret-tokenX"),
    ] {
        let mut r = post("/actors/tickets/t1/ask");
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        let resp = app
            .clone()
            .oneshot(r.body(Body::from(r#"{"Add": 1}"#)).expect("request"))
            .await
            .expect("infallible");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    }
    assert_eq!(rt.metrics().invocations, 0, "a refused request ran");
    let r = post("/actors/tickets/t1/ask")
        .header("authorization", "Bearer s3cret-token")
        .body(Body::from(r#"{"Add": 1}"#))
        .expect("request");
    assert_eq!(call(&app, r).await, (StatusCode::OK, json!(1)));
    rt.shutdown().await;
}

/// DNS rebinding: a page whose name an attacker points at this machine sends to the ingress as
/// its own origin, so the browser does not ask first, and the JSON check stops nothing; its
/// requests carry its own name in `Host`, and an ingress given its own names refuses them
/// before anything is sent.
#[tokio::test]
async fn a_request_under_another_host_name_is_refused_when_names_are_set() {
    let rt = start().await;
    let bound: std::net::SocketAddr = "127.0.0.1:8080".parse().expect("address");
    let app = loom_http::router(
        rt.clone(),
        Options {
            hosts: loom_http::AdminOptions::hosts_for(bound),
            ..Options::default()
        },
    );
    for host in [Some("rebound.example:8080"), Some("localhost:9999"), None] {
        for path in ["/actors/tickets/t1/ask", "/actors/tickets/t1/send"] {
            let mut r = post(path);
            if let Some(h) = host {
                r = r.header("host", h);
            }
            let (s, b) = call(&app, r.body(Body::from(r#"{"Add": 1}"#)).expect("request")).await;
            assert_eq!(
                (s, &b["error"]),
                (StatusCode::FORBIDDEN, &json!("forbidden_host")),
                "{host:?} {path}: {b}"
            );
        }
    }
    let id = ActorId::new("tickets", "t1").expect("id");
    assert_eq!(
        rt.store().pending(&id).await.expect("pending"),
        0,
        "a refused request sent"
    );
    assert_eq!(rt.metrics().invocations, 0, "a refused request ran");
    for host in [
        "localhost:8080",
        "LOCALHOST:8080",
        "127.0.0.1:8080",
        "[::1]:8080",
    ] {
        let r = post("/actors/tickets/t1/ask").header("host", host);
        let (s, b) = call(&app, r.body(Body::from(r#"{"Add": 1}"#)).expect("request")).await;
        assert_eq!(s, StatusCode::OK, "{host}: {b}");
    }
    // Without names (the default, as behind a proxy that checks them), any host is served.
    let open = loom_http::router(rt.clone(), Options::default());
    let r = post("/actors/tickets/t1/ask").header("host", "rebound.example:8080");
    let (s, b) = call(&open, r.body(Body::from(r#"{"Add": 1}"#)).expect("request")).await;
    assert_eq!((s, b), (StatusCode::OK, json!(5)));
    rt.shutdown().await;
}

#[tokio::test]
async fn a_caller_trace_is_carried_into_the_message() {
    let rt = start().await;
    let app = loom_http::router(rt.clone(), Options::default());
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    // Delayed, so that it is still in the mailbox to be looked at.
    let r = post("/actors/tickets/t1/send?delay_ms=600000")
        .header("traceparent", parent)
        .body(Body::from(r#"{"Add": 1}"#))
        .expect("request");
    let (s, b) = call(&app, r).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let id = ActorId::new("tickets", "t1").expect("id");
    let waiting = rt.store().messages(&id, None, 10).await.expect("messages");
    assert_eq!(waiting.len(), 1);
    let tp = waiting[0]
        .envelope
        .traceparent
        .clone()
        .expect("a traceparent");
    // The message names the caller's span: the invocation that handles it is its child.
    assert_eq!(tp, parent);
    rt.shutdown().await;
}

#[tokio::test]
async fn a_waiting_invocation_is_cancelled_by_its_key() {
    let rt = start().await;
    let app = loom_http::router(rt.clone(), Options::default());
    let waiting = tokio::spawn({
        let app = app.clone();
        async move {
            let r = post("/actors/tickets/t4/ask")
                .header("idempotency-key", "order-9")
                .body(Body::from(r#"{"WaitFor": "approved"}"#))
                .expect("request");
            call(&app, r).await
        }
    });
    let cancel = || req("/actors/tickets/t4/cancel", r#"{"key": "order-9"}"#);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (s, b) = call(&app, cancel()).await;
        if s == StatusCode::OK {
            assert_eq!(b["result"], "requested", "{b}");
            break;
        }
        assert_eq!(
            (s, &b["error"]),
            (StatusCode::NOT_FOUND, &json!("not_found")),
            "{b}"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ask never sent its message"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (s, b) = waiting.await.expect("join");
    assert_eq!(
        (s, &b["error"]),
        (StatusCode::CONFLICT, &json!("cancelled")),
        "{b}"
    );
    let (s, b) = call(&app, req("/actors/tickets/t4/cancel", r#"{"colour": 1}"#)).await;
    assert_eq!(
        (s, &b["error"]),
        (StatusCode::BAD_REQUEST, &json!("bad_message")),
        "{b}"
    );
    rt.shutdown().await;
}

/// A full mailbox: a new message gets `429` with `Retry-After`, but a retry with the key of a
/// message already in it is that message's duplicate (a `504` naming the key while it waits,
/// its reply once recorded), never `429`, which says nothing was sent. Before, the retry got
/// `429` and no `Retry-After` came.
#[tokio::test]
async fn a_keyed_retry_into_a_full_mailbox_is_not_refused_as_full() {
    let rt = Runtime::builder()
        .memory()
        .configure(|c| c.max_mailbox = Some(1))
        .register_actor(Tickets)
        .start()
        .await
        .expect("start");
    let app = loom_http::router(rt.clone(), Options::default());
    let ask = || {
        post("/actors/tickets/full/ask?timeout_ms=300")
            .header("idempotency-key", "k-1")
            .body(Body::from(r#"{"WaitFor": "go"}"#))
            .expect("request")
    };
    let (s, b) = call(&app, ask()).await;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT, "{b}");
    let (s, b) = call(&app, ask()).await;
    assert_eq!(
        (s, &b["idempotency_key"]),
        (StatusCode::GATEWAY_TIMEOUT, &json!("k-1")),
        "{b}"
    );
    let resp = app
        .clone()
        .oneshot(req("/actors/tickets/full/send", r#"{"Add": 1}"#))
        .await
        .expect("infallible");
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .map(|v| v.to_str().expect("text")),
        Some(loom_http::RETRY_AFTER_SECS)
    );
    let (s, b) = call(&app, req("/actors/tickets/full/events/go", r#"{"n": 1}"#)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let recorded = post("/actors/tickets/full/ask?timeout_ms=10000")
        .header("idempotency-key", "k-1")
        .body(Body::from(r#"{"WaitFor": "go"}"#))
        .expect("request");
    assert_eq!(
        call(&app, recorded).await,
        (StatusCode::OK, json!({ "got": { "n": 1 } }))
    );
    rt.shutdown().await;
}

/// A body trickled slower than `Options::body_timeout` is refused with `408` and sends nothing,
/// instead of holding its connection and buffer for as long as the client likes.
#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_refused() {
    let rt = start().await;
    let app = loom_http::router(
        rt.clone(),
        Options {
            body_timeout: Duration::from_millis(200),
            ..Options::default()
        },
    );
    use futures::StreamExt as _;
    let trickle = futures::stream::iter([Ok::<_, std::io::Error>(axum::body::Bytes::from_static(
        b"{\"Add\"",
    ))])
    .chain(futures::stream::pending());
    let r = post("/actors/tickets/slow/send")
        .body(Body::from_stream(trickle))
        .expect("request");
    let started = std::time::Instant::now();
    let (s, b) = call(&app, r).await;
    assert_eq!(
        (s, &b["error"]),
        (StatusCode::REQUEST_TIMEOUT, &json!("body_timeout")),
        "{b}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let slow = ActorId::new("tickets", "slow").expect("id");
    assert_eq!(rt.store().pending(&slow).await.expect("pending"), 0);
    rt.shutdown().await;
}
