//! One bank transfer is one OpenTelemetry trace: the client's span, then the transfer's
//! invocation, the source account's debit, the transfer again, the target account's credit,
//! each the child of the one before, with the activity and store writes inside them and the
//! relay hops between partitions linked to the trace. Spans go to an in-memory exporter through
//! `tracing-opentelemetry`, as an application's would go to its collector.

#[path = "../examples/bank/actors.rs"]
#[allow(dead_code)]
mod actors;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actors::{Account, AccountMsg, Status, Transfer, TransferMsg};
use loom_core::partition::partition_of;
use loom_core::runtime::Runtime;
use loom_core::{ActorId, EmbeddedOptions, EmbeddedStore};
use opentelemetry::trace::{SpanId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

const PARTITIONS: u32 = 4;

/// A key of `kind` in a partition other than those of `others`, so that messages between them
/// cross partitions (through the relay).
fn elsewhere(kind: &str, prefix: &str, others: &[u32]) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|k| {
            let id = ActorId::new(kind, k.as_str()).expect("id");
            !others.contains(&partition_of(&id, PARTITIONS))
        })
        .expect("a key")
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_transfer_is_one_trace_from_the_client_through_both_accounts() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("trace-chain")));
    // Global: the runtime's tasks run on every worker thread (one test in this binary).
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");

    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open_with(
        dir.path(),
        EmbeddedOptions {
            partitions: Some(PARTITIONS),
            ..EmbeddedOptions::default()
        },
    )
    .expect("open");
    let rt = Runtime::builder()
        .store(store)
        .register::<Account>()
        .register::<Transfer>()
        .start()
        .await
        .expect("start");
    let part = |kind: &str, key: &str| partition_of(&ActorId::new(kind, key).unwrap(), PARTITIONS);
    let t = "t1";
    let from = elsewhere("account", "from-", &[part("transfer", t)]);
    let to = elsewhere(
        "account",
        "to-",
        &[part("transfer", t), part("account", &from)],
    );
    for (key, amount) in [(&from, 100), (&to, 0)] {
        rt.actor::<Account>(key)
            .unwrap()
            .ask(AccountMsg::Open(amount))
            .await
            .expect("open the account");
    }

    let client = tracing::info_span!("client");
    let transfer = rt.actor::<Transfer>(t).unwrap();
    let started = transfer
        .ask(TransferMsg::Start {
            from: from.clone(),
            to: to.clone(),
            amount: 30,
        })
        .instrument(client.clone())
        .await
        .expect("start the transfer");
    assert_eq!(started, Status::Debiting);
    drop(client);

    // The chain is complete once the transfer's invocation for `Credited` has ended.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (spans, chain) = loop {
        let spans = exporter.get_finished_spans().expect("spans");
        let root = spans.iter().find(|s| s.name == "client");
        let chain = root.map(|root| {
            let by_parent: HashMap<SpanId, Vec<&SpanData>> =
                spans.iter().fold(HashMap::new(), |mut m, s| {
                    m.entry(s.parent_span_id).or_default().push(s);
                    m
                });
            let mut chain = vec![root];
            // Each hop: the one invocation that is a child of the span before.
            while let Some(next) = by_parent
                .get(&chain.last().unwrap().span_context.span_id())
                .and_then(|kids| kids.iter().find(|s| s.name.ends_with(" invocation")))
            {
                chain.push(next);
            }
            chain.into_iter().cloned().collect::<Vec<_>>()
        });
        match chain {
            Some(c) if c.len() >= 6 => break (spans.clone(), c),
            other => assert!(
                Instant::now() < deadline,
                "no full chain within 30 s: {:?}",
                other.map(|c| c.iter().map(|s| s.name.to_string()).collect::<Vec<_>>())
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let names: Vec<String> = chain.iter().map(|s| s.name.to_string()).collect();
    assert_eq!(
        names[..6],
        [
            "client",
            "transfer invocation",
            "account invocation",
            "transfer invocation",
            "account invocation",
            "transfer invocation",
        ],
        "{names:?}"
    );
    let actors: Vec<Option<String>> = chain[1..6].iter().map(|s| attr(s, "actor")).collect();
    let (transfer_id, from_id, to_id) = (
        format!("transfer/{t}"),
        format!("account/{from}"),
        format!("account/{to}"),
    );
    assert_eq!(
        actors,
        [&transfer_id, &from_id, &transfer_id, &to_id, &transfer_id].map(|a| Some(a.clone())),
        "debit then credit"
    );
    let trace = chain[0].span_context.trace_id();
    assert!(
        chain.iter().all(|s| s.span_context.trace_id() == trace),
        "not one trace"
    );
    // Inside the first invocation: the fraud check (the whole activity) and its store writes.
    let inside = |parent: &SpanData, name: &str| -> Vec<SpanData> {
        spans
            .iter()
            .filter(|s| s.parent_span_id == parent.span_context.span_id() && s.name == name)
            .cloned()
            .collect()
    };
    let check = inside(&chain[1], "activity fraud-check");
    assert_eq!(check.len(), 1);
    // The activity's start is durable before it runs, its result before it returns: two
    // writes inside the activity's span.
    assert_eq!(inside(&check[0], "loom.store.commit").len(), 2);
    assert_eq!(inside(&chain[1], "loom.store.commit").len(), 1, "the turn");
    for hop in &chain[2..6] {
        assert!(
            !inside(hop, "loom.store.commit").is_empty(),
            "{} wrote nothing",
            hop.name
        );
    }
    // The four messages crossed partitions: relay hops, each linked to this trace.
    let hops = spans
        .iter()
        .filter(|s| s.name == "loom.relay")
        .filter(|s| s.links.iter().any(|l| l.span_context.trace_id() == trace))
        .count();
    assert!(hops >= 4, "{hops} relay hops linked to the trace");
    // The status reads and the openings are traces of their own.
    assert!(
        spans
            .iter()
            .filter(|s| s.name == "account invocation")
            .any(|s| s.span_context.trace_id() != trace)
    );
    rt.shutdown().await;
    provider.shutdown().expect("shut the provider down");
}
