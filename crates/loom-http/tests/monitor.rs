//! `loom_http::monitor`'s `/metrics`, scraped in-process: the gauges read from the store at the
//! scrape (mailboxes waiting and ready, the longest wait, parked actors) per hosted kind, the
//! relay's backlog per partition, and store health. One test per binary: the Prometheus recorder is global.

use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use loom_core::runtime::{Runtime, SendOptions};
use loom_core::{ActorId, Park};
use loom_testkit::runtime::Counter;
use tower::ServiceExt;

async fn scrape(app: &axum::Router) -> String {
    let resp = app
        .clone()
        .oneshot(
            Request::get("/metrics")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("scrape");
    assert_eq!(resp.status().as_u16(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(body.to_vec()).expect("text")
}

fn value(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the scrape:\n{scrape}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_reads_what_waits_and_what_is_parked_from_the_store() {
    let prometheus = loom_http::install_prometheus().expect("the only recorder");
    // Two partitions: the relay's backlog is scraped too.
    let dir = tempfile::tempdir().expect("temp dir");
    let opts = loom_core::EmbeddedOptions {
        partitions: Some(2),
        ..Default::default()
    };
    let store = loom_core::EmbeddedStore::open_with(dir.path(), opts).expect("store");
    let rt = Runtime::builder()
        .store(store)
        .register::<Counter>()
        .start()
        .await
        .expect("start");
    let app = loom_http::monitor(rt.clone(), prometheus);
    let first = scrape(&app).await;
    assert_eq!(
        value(&first, r#"loom_mailboxes_waiting{kind="counter"}"#),
        0.0
    );
    assert_eq!(value(&first, r#"loom_parked_actors{kind="counter"}"#), 0.0);
    assert_eq!(value(&first, "loom_store_healthy"), 1.0);
    for p in ["0", "1"] {
        let name = format!("loom_relay_waiting{{partition=\"{p}\"}}");
        assert_eq!(value(&first, &name), 0.0, "{first}");
    }

    // One job due in an hour waits (not ready); one actor is parked.
    let later = rt.actor::<Counter>("later").expect("ref");
    later
        .send_with(
            1,
            SendOptions {
                delay: Some(Duration::from_secs(3600)),
                ..Default::default()
            },
        )
        .await
        .expect("send");
    let broken = ActorId::new("counter", "broken").expect("id");
    rt.store()
        .park(&broken, &Park::new("node-a", "a bug"), None)
        .await
        .expect("park");
    assert_eq!(
        rt.actor::<Counter>("now")
            .expect("ref")
            .ask(2)
            .await
            .expect("ask"),
        2
    );
    let next = scrape(&app).await;
    assert_eq!(
        value(&next, r#"loom_mailboxes_waiting{kind="counter"}"#),
        1.0,
        "{next}"
    );
    assert_eq!(
        value(&next, r#"loom_mailboxes_ready{kind="counter"}"#),
        0.0,
        "{next}"
    );
    assert_eq!(
        value(&next, r#"loom_mailbox_wait_seconds{kind="counter"}"#),
        0.0,
        "{next}"
    );
    assert_eq!(
        value(&next, r#"loom_parked_actors{kind="counter"}"#),
        1.0,
        "{next}"
    );
    assert!(
        value(&next, r#"loom_invocations_total{kind="counter"}"#) >= 1.0,
        "{next}"
    );
    let health = |app: axum::Router| async move {
        let resp = app
            .oneshot(
                Request::get("/health")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("health");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
        (status, json["node"]["state"].as_str().map(str::to_owned))
    };
    let (status, node) = health(app.clone()).await;
    assert!(
        status == 200 && node.as_deref() != Some("stopping"),
        "{status} {node:?}"
    );
    rt.shutdown().await;
    // A node that stopped taking messages says so (*before*: 200 and "member").
    assert_eq!(health(app).await, (503, Some("stopping".to_owned())));
}
