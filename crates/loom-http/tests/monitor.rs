//! `loom_http::monitor`'s `/metrics`, scraped in-process: the gauges read from the store at the
//! scrape (mailboxes waiting and ready, the longest wait, parked actors) per hosted kind, and
//! store health. One test per binary: the Prometheus recorder is global.

use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use loom_core::runtime::{Actor, Context, Rejected, Runtime, SendOptions};
use loom_core::{ActorId, Park};
use tower::ServiceExt;

struct Jobs;

impl Actor for Jobs {
    const KIND: &'static str = "jobs";
    type State = u64;
    type Message = u64;
    type Reply = u64;

    async fn handle(&self, n: &mut u64, _: &mut Context<'_>, k: u64) -> Result<u64, Rejected> {
        *n += k;
        Ok(*n)
    }
}

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
    let rt = Runtime::builder()
        .memory()
        .register_actor(Jobs)
        .start()
        .await
        .expect("start");
    let app = loom_http::monitor(rt.clone(), prometheus);
    let first = scrape(&app).await;
    assert_eq!(value(&first, r#"loom_mailboxes_waiting{kind="jobs"}"#), 0.0);
    assert_eq!(value(&first, r#"loom_parked_actors{kind="jobs"}"#), 0.0);
    assert_eq!(value(&first, "loom_store_healthy"), 1.0);

    // One job due in an hour waits (not ready); one actor is parked.
    let later = rt.actor::<Jobs>("later").expect("ref");
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
    let broken = ActorId::new("jobs", "broken").expect("id");
    rt.store()
        .park(&broken, &Park::new("node-a", "a bug"), None)
        .await
        .expect("park");
    assert_eq!(
        rt.actor::<Jobs>("now")
            .expect("ref")
            .ask(2)
            .await
            .expect("ask"),
        2
    );
    let next = scrape(&app).await;
    assert_eq!(
        value(&next, r#"loom_mailboxes_waiting{kind="jobs"}"#),
        1.0,
        "{next}"
    );
    assert_eq!(
        value(&next, r#"loom_mailboxes_ready{kind="jobs"}"#),
        0.0,
        "{next}"
    );
    assert_eq!(
        value(&next, r#"loom_mailbox_wait_seconds{kind="jobs"}"#),
        0.0,
        "{next}"
    );
    assert_eq!(
        value(&next, r#"loom_parked_actors{kind="jobs"}"#),
        1.0,
        "{next}"
    );
    assert!(
        value(&next, r#"loom_invocations_total{kind="jobs"}"#) >= 1.0,
        "{next}"
    );
    rt.shutdown().await;
}
