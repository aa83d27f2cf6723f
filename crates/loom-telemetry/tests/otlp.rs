//! The bank example exports its spans over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` says where:
//! a collector stand-in (an HTTP server that decodes the protobuf posted to `/v1/traces`)
//! receives the transfers' traces, each account's invocation a child of its transfer's.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// What the stand-in received: each request's spans, with the service that sent them.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

async fn collector() -> (String, Received, tokio::task::JoinHandle<()>) {
    let received: Received = Arc::default();
    let app = axum::Router::new().route(
        "/v1/traces",
        post({
            let received = received.clone();
            move |body: Bytes| async move {
                let req = ExportTraceServiceRequest::decode(body).expect("an OTLP request");
                let mut got = received.lock().expect("lock");
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|kv| kv.key == "service.name")
                        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                            Value::StringValue(s) => Some(s.clone()),
                            _ => None,
                        })
                        // None named: "", which the test's check of the name refuses.
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        got.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
                    }
                }
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    (url, received, server)
}

fn bank() -> std::path::PathBuf {
    loom_testkit::examples::example("bank")
}

async fn run_bank(endpoint: &str) {
    let data = tempfile::tempdir().expect("temp dir");
    let mut cmd = Command::new(bank());
    cmd.args(["--accounts", "4", "--transfers", "10", "--data"])
        .arg(data.path().join("bank"))
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("OTEL_SDK_DISABLED")
        .env_remove("OTEL_TRACES_SAMPLER")
        .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let status = tokio::task::spawn_blocking(move || cmd.status())
        .await
        .expect("join")
        .expect("run the bank");
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bank_sends_its_traces_to_the_collector_it_is_given() {
    let (url, received, server) = collector().await;
    // The bank flushes what is batched as it exits: everything is there once it has.
    run_bank(&url).await;
    let spans = received.lock().expect("lock").clone();
    assert!(
        spans.iter().all(|(service, _)| service == "bank"),
        "another service name"
    );
    let named = |name: &'static str| spans.iter().filter(move |(_, s)| s.name == name);
    // 10 transfers: each is started, debited and credited (or refused): at least 10 and 30
    // invocations of each kind between them, with their fraud checks and store writes.
    assert!(named("transfer invocation").count() >= 20);
    assert!(named("account invocation").count() >= 10);
    assert_eq!(named("activity fraud-check").count(), 10);
    assert!(named("loom.store.commit").count() >= 30);
    // An account's debit is a child of its transfer's invocation, in the transfer's trace.
    let transfers: Vec<&Span> = named("transfer invocation").map(|(_, s)| s).collect();
    let children = named("account invocation")
        .filter(|(_, a)| {
            transfers
                .iter()
                .any(|t| t.span_id == a.parent_span_id && t.trace_id == a.trace_id)
        })
        .count();
    assert!(
        children >= 10,
        "{children} account invocations are children of a transfer's"
    );

    server.abort();
}

/// An endpoint the exporter cannot use loses the traces, not the logs: the bank runs, and says
/// so on stderr, even under a `RUST_LOG` that hides warnings.
#[test]
fn a_bad_endpoint_is_a_warning_and_the_program_runs() {
    let data = tempfile::tempdir().expect("temp dir");
    let out = Command::new(bank())
        .args(["--accounts", "2", "--transfers", "2", "--data"])
        .arg(data.path().join("bank"))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("OTEL_SDK_DISABLED")
        .env("RUST_LOG", "error")
        .output()
        .expect("run the bank");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("spans are not exported"), "{err}");
}
