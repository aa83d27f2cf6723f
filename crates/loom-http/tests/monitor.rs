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
use serde_json::json;
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

fn value(scrape: &str, series: &str) -> f64 {
    loom_testkit::scrape::value(scrape, series)
        .unwrap_or_else(|| panic!("no {series} in the scrape:\n{scrape}"))
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
    // Faults on command: a turn's write refused once, below.
    let faulty = loom_testkit::faults::FaultyStore::new(std::sync::Arc::new(store));
    let faults = faulty.faults.clone();
    let rt = Runtime::builder()
        .store(faulty)
        .configure(|c| c.node = "watched".into())
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
    assert_eq!(value(&first, r#"loom_store_healthy{node="watched"}"#), 1.0);
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
        (status, json)
    };
    let (status, h) = health(app.clone()).await;
    assert!(
        status == 200 && h["node"]["state"] != "stopping",
        "{status} {h}"
    );
    // Committed turns are observed without an `outcome` label; none failed yet.
    assert!(
        value(&next, r#"loom_store_commit_seconds_count{kind="counter"}"#) >= 1.0,
        "{next}"
    );
    let failed_turns = r#"loom_turn_seconds_count{kind="counter",outcome="failed"}"#;
    assert_eq!(
        loom_testkit::scrape::value(&next, failed_turns).unwrap_or(0.0),
        0.0,
        "{next}"
    );
    // A turn whose write is refused is observed too, under `outcome="failed"` (*before*: not
    // at all, so commits that time out left the latency a dashboard shows unchanged). Each
    // message is retried and counts.
    for (add, total) in [(3, 5), (4, 9)] {
        faults
            .fail_writes
            .store(1, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            rt.actor::<Counter>("now")
                .expect("ref")
                .ask(add)
                .await
                .expect("ask, retried"),
            total
        );
    }
    // The store failed, served, and failed again, as one failing in part does: /health says
    // it is degraded, with its latest success, and stays 200 (*before*: 200 or 503 by the
    // latest request).
    let (status, h) = health(app.clone()).await;
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["store"]["state"], "degraded", "{h}");
    assert!(h["store"]["last_success"].is_u64(), "{h}");
    let failed = scrape(&app).await;
    assert_eq!(value(&failed, r#"loom_store_healthy{node="watched"}"#), 1.0);
    assert_eq!(
        value(&failed, r#"loom_store_degraded{node="watched"}"#),
        1.0
    );
    for name in ["loom_store_commit_seconds", "loom_turn_seconds"] {
        let series = format!(r#"{name}_count{{kind="counter",outcome="failed"}}"#);
        assert_eq!(value(&failed, &series), 2.0, "{failed}");
    }

    // A backlog read slower than the scrape's 2 s bound (a kind of a million mailboxes): the
    // scrape shows the latest reading and its age, and the read ends in the background for
    // the next scrape, which starts no second one (*before*: NaN at every scrape, each
    // starting a walk of its own).
    let waiting = r#"loom_mailboxes_waiting{kind="counter"}"#;
    let age = r#"loom_mailbox_backlog_age_seconds{kind="counter"}"#;
    assert_eq!(value(&failed, waiting), 1.0, "{failed}");
    assert!(value(&failed, age) < 1.0, "{failed}");
    rt.actor::<Counter>("later-too")
        .expect("ref")
        .send_with(
            1,
            SendOptions {
                delay: Some(Duration::from_secs(3600)),
                ..Default::default()
            },
        )
        .await
        .expect("send");
    let reads = || faults.backlogs.load(std::sync::atomic::Ordering::SeqCst);
    let before = reads();
    faults
        .slow_backlogs
        .store(3_000, std::sync::atomic::Ordering::SeqCst);
    let slow = scrape(&app).await;
    assert_eq!(value(&slow, waiting), 1.0, "the latest reading: {slow}");
    assert!(value(&slow, age) >= 2.0, "{slow}");
    let read = scrape(&app).await;
    assert_eq!(value(&read, waiting), 2.0, "the read that went on: {read}");
    assert!(value(&read, age) < 1.0, "{read}");
    assert_eq!(reads(), before + 1, "one read for both scrapes");
    // A read that took that long is reused for four times as long: no walk at each scrape.
    let reused = scrape(&app).await;
    assert_eq!(value(&reused, waiting), 2.0, "{reused}");
    assert_eq!(reads(), before + 1, "the read reused");
    faults
        .slow_backlogs
        .store(0, std::sync::atomic::Ordering::SeqCst);
    rt.shutdown().await;
    // A node that stopped taking messages says so (*before*: 200 and "member").
    let (status, h) = health(app).await;
    assert_eq!(
        (status, &h["node"]["state"]),
        (503, &json!("stopping")),
        "{h}"
    );
}
