//! An HTTP ingress for Loom: any service that speaks HTTP sends messages to actors, asks them
//! and delivers events to them, with JSON bodies.
//!
//! [`router`] mounts, for every actor kind the runtime hosts or declares hosted by other nodes
//! ([`RuntimeBuilder::sends_to`](loom_core::runtime::RuntimeBuilder::sends_to)):
//!
//! | request | does | answers |
//! | --- | --- | --- |
//! | `POST /actors/{kind}/{key}/send` | [`AnyActorRef::send_json`] | `202 {"message_id": …}` (`200 {"duplicate": true}` for a repeated key) |
//! | `POST /actors/{kind}/{key}/ask` | [`AnyActorRef::ask_json`] | `200` with the handler's reply as the body |
//! | `POST /actors/{kind}/{key}/events/{name}` | [`AnyActorRef::deliver_event_with`] | `202 {"message_id": …}` (`200 {"duplicate": true}`) |
//! | `POST /actors/{kind}/{key}/cancel` | [`AnyActorRef::cancel`] / [`cancel_key`](AnyActorRef::cancel_key), body `{"message": id}` or `{"key": k}` | `200 {"result": "requested", …}`, `404 not_found` if nothing waits |
//!
//! The body is the message (or the event's data) as JSON; a message is checked against the
//! kind's message type before anything is sent (by this node's code: during a rolling upgrade,
//! a node still on the old code refuses a message only the new code knows). Headers:
//!
//! - `Content-Type: application/json`, required (`415` otherwise): a web page cannot make a
//!   browser send that cross-site without asking first, so a page a user visits cannot send
//!   messages through the user's browser.
//! - `Idempotency-Key`: a retried request with the same key is applied once (a repeated send
//!   answers `duplicate`; a repeated ask answers the recorded reply; for an event, the key is
//!   the event's key).
//! - `traceparent` (W3C trace context): the caller's span is the parent of the invocation
//!   that handles the message.
//! - `Authorization: Bearer <token>` when [`Options::token`] is set, compared in constant time.
//! - `Host`: one of [`Options::hosts`] when it is not empty (`403 forbidden_host`
//!   otherwise). A page whose name an attacker rebinds to this address (DNS rebinding) reaches
//!   the ingress as its own origin, where the JSON check above stops nothing; its requests
//!   carry its own name. [`AdminOptions::hosts_for`] gives a loopback listener's own names.
//!
//! Query parameters: `timeout_ms` (ask; at most [`Options::max_ask_timeout`]) and `delay_ms`
//! (send). Every error of these routes is JSON, `{"error": code, "message": text}` with a
//! status that says what kind of error it is (see [`ApiError`]). Nothing is sent when a
//! request is refused (`400`, `401`, `403`, `404`, `408`, `413`, `415`, `429`: a retry with the key of
//! a message already in a full mailbox is its duplicate, not a `429`); a `409`, `422` or
//! `500 failed` answers a message that was sent and ended so. A `503` may come after the
//! message was stored, and a `504` leaves it to run (or, the store slow to answer, unsent): an
//! ask's response then names the key it
//! went under (`"idempotency_key"` and the `Idempotency-Key` header; the ingress makes one up
//! when the ask gave none), and asking again with it returns the reply without running the
//! message twice. A send is safe to retry only with a key.
//!
//! Serve the routers with [`serve`], not `axum::serve`: it closes a connection whose headers
//! take longer than [`ServeOptions::header_timeout`] (and a kept-alive one idle as long) or
//! whose client stops reading its answer ([`ServeOptions::write_timeout`]), and serves at most
//! [`ServeOptions::max_connections`] at once, so that clients trickling headers, leaving
//! answers unread or opening connections by the thousand cannot take the process's file
//! descriptors, which its store needs too.
//!
//! ```no_run
//! use loom_core::runtime::{Actor, Context, Rejected, Runtime};
//!
//! struct Counter;
//! impl Actor for Counter {
//!     const KIND: &'static str = "counter";
//!     type State = u64;
//!     type Message = u64;
//!     type Reply = u64;
//!     async fn handle(&self, n: &mut u64, _: &mut Context<'_>, add: u64) -> Result<u64, Rejected> {
//!         *n += add;
//!         Ok(*n)
//!     }
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let rt = Runtime::builder().embedded("./loom-data").register_actor(Counter).start().await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! let opts = loom_http::Options {
//!     // Only under this machine's own names: no other name resolving here reaches it.
//!     hosts: loom_http::AdminOptions::hosts_for(listener.local_addr()?),
//!     ..loom_http::Options::default()
//! };
//! let app = loom_http::router(rt.clone(), opts);
//! // curl localhost:8080/actors/counter/visits/ask --json 2   → 2
//! // Headers within 30 s, at most 1 024 connections at once, until Ctrl-C.
//! let ctrl_c = async {
//!     if tokio::signal::ctrl_c().await.is_err() {
//!         std::future::pending::<()>().await;
//!     }
//! };
//! loom_http::serve(listener, app, loom_http::ServeOptions::default(), ctrl_c).await;
//! # Ok(()) }
//! ```

mod admin;
mod error;
mod reads;
mod serve;

use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use loom_core::IdempotencyKey;
use loom_core::runtime::{
    AnyActorRef, AskOptions, CancelTarget, Cancellation, EventOptions, Runtime, SendOptions, Sent,
};
use serde::Deserialize;
use serde_json::{Value, json};

pub use admin::{AdminOptions, MAX_PAGE, MAX_PAGE_BYTES, admin};
pub use error::{ApiError, RETRY_AFTER_SECS};
pub use metrics_exporter_prometheus::{BuildError, PrometheusHandle};
pub use serve::{ServeOptions, serve};

use metrics_exporter_prometheus::PrometheusBuilder;

/// How the ingress behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// When set, every request must carry `Authorization: Bearer <token>`; others are refused
    /// with `401`. The comparison takes the same time whatever the presented token is. An
    /// empty token admits no request.
    pub token: Option<String>,
    /// Largest request body, in bytes; a larger one is refused with `413` before it is read
    /// to the end. Default: [`loom_core::limits::MAX_MESSAGE_BYTES`], the largest message.
    pub max_body_bytes: usize,
    /// Longest `timeout_ms` an ask may give (default 5 minutes); an ask without one waits
    /// `Config::ask_timeout`.
    pub max_ask_timeout: Duration,
    /// When not empty, the only `Host` headers served (compared without regard to case);
    /// a request under any other name is refused with `403 forbidden_host` before anything
    /// is sent. A web page whose name is rebound to this address (DNS rebinding) sends as its
    /// own origin, without the browser asking first, but under its own name. Give a loopback
    /// listener [`AdminOptions::hosts_for`] its address; empty (the default) serves any name,
    /// for an ingress behind a proxy that checks the host.
    pub hosts: Vec<String>,
    /// Longest a request's body may take to arrive (default 30 s); a slower one is refused
    /// with `408 body_timeout`, so that a client trickling a body holds no connection and no
    /// buffer for longer. (Headers are the server's to time: [`serve`] does, with
    /// [`ServeOptions::header_timeout`]; `axum::serve` does not.)
    pub body_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            token: None,
            max_body_bytes: loom_core::limits::MAX_MESSAGE_BYTES,
            max_ask_timeout: Duration::from_secs(300),
            hosts: Vec::new(),
            body_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Clone)]
struct Ingress {
    rt: Runtime,
    opts: std::sync::Arc<Options>,
}

/// The ingress routes over `rt` (see the crate's documentation), ready to serve with
/// `axum::serve` or to nest in an application's own router.
pub fn router(rt: Runtime, opts: Options) -> Router {
    let state = Ingress {
        rt,
        opts: std::sync::Arc::new(opts),
    };
    Router::new()
        .route("/actors/{kind}/{key}/send", post(send))
        .route("/actors/{kind}/{key}/ask", post(ask))
        .route("/actors/{kind}/{key}/events/{name}", post(event))
        .route("/actors/{kind}/{key}/cancel", post(cancel))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
}

/// Refuses a request under a host name not allowed, or without the configured bearer token.
async fn authorize(State(s): State<Ingress>, req: Request, next: Next) -> Response {
    if let Err(e) = admin::allowed_host(&s.opts.hosts, req.headers()) {
        return e.into_response();
    }
    if let Some(token) = &s.opts.token
        && !authorized(req.headers(), token)
    {
        return ApiError::Unauthorized.into_response();
    }
    next.run(req).await
}

/// Whether `headers` carry `Authorization: Bearer <expected>` (the scheme in any case), the
/// token compared in time that does not depend on where it differs. An empty token is never
/// accepted, so an empty configured token admits nothing.
pub(crate) fn authorized(headers: &HeaderMap, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        })
        .unwrap_or("");
    // `ct_eq` on slices of different lengths returns false at once; that reveals the length
    // only, which a token's format does anyway.
    !presented.is_empty() && bool::from(presented.as_bytes().ct_eq(expected.as_bytes()))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    timeout_ms: Option<u64>,
    delay_ms: Option<u64>,
}

/// The actor a request names, and its parsed headers, query and body.
struct Call {
    actor: AnyActorRef,
    key: Option<IdempotencyKey>,
    traceparent: Option<String>,
    params: Params,
    body: Value,
}

impl Ingress {
    async fn call(
        &self,
        kind: &str,
        key: &str,
        headers: &HeaderMap,
        query: Result<Query<Params>, QueryRejection>,
        body: Body,
    ) -> Result<Call, ApiError> {
        // JSON only: a web page can send a form or plain text to any address without asking
        // (no CORS preflight), but not `application/json`, so a page the user visits cannot
        // make the user's browser send messages here.
        let json = headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(ApiError::NotJson);
        }
        let actor = self.rt.any_actor(kind, key)?;
        let params = query
            .map_err(|e| ApiError::BadRequest(format!("query: {}", e.body_text())))?
            .0;
        let key = header(headers, "idempotency-key")?
            .map(IdempotencyKey::new)
            .transpose()
            .map_err(|e| ApiError::BadRequest(format!("Idempotency-Key: {e}")))?;
        let traceparent = header(headers, "traceparent")?;
        let bytes = tokio::time::timeout(
            self.opts.body_timeout,
            read_body(body, self.opts.max_body_bytes),
        )
        .await
        .map_err(|_| ApiError::BodyTimeout(self.opts.body_timeout))??;
        // A message's payload nests one level inside its envelope, and two inside the entry
        // that invokes it, which is stored no deeper than `MAX_JSON_DEPTH`: refused before
        // parsing, as too large.
        let depth = loom_core::codec::json_depth(&bytes);
        let most = loom_core::limits::MAX_JSON_DEPTH - 2;
        if depth > most {
            return Err(ApiError::TooLarge(format!(
                "the body nests {depth} levels deep; a message may nest {most}"
            )));
        }
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::BadMessage(format!("the body is not JSON: {e}")))?
        };
        Ok(Call {
            actor,
            key,
            traceparent,
            params,
            body,
        })
    }
}

fn header(headers: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map(str::to_owned)
                .map_err(|_| ApiError::BadRequest(format!("{name}: not visible ASCII")))
        })
        .transpose()
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        // The only error `to_bytes` makes itself is the limit; others come from the connection.
        let mut cause = std::error::Error::source(&e);
        let mut limited = false;
        while let Some(c) = cause {
            limited |= c.is::<http_body_util::LengthLimitError>();
            cause = c.source();
        }
        if limited {
            ApiError::TooLarge(format!("the body is larger than {limit} bytes"))
        } else {
            ApiError::BadRequest(format!("the body could not be read: {e}"))
        }
    })
}

fn path(p: Result<Path<(String, String)>, PathRejection>) -> Result<(String, String), ApiError> {
    p.map(|Path(v)| v)
        .map_err(|e| ApiError::BadRequest(e.body_text()))
}

async fn send(
    State(s): State<Ingress>,
    p: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<Params>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (kind, key) = path(p)?;
    let c = s.call(&kind, &key, &headers, query, body).await?;
    if c.params.timeout_ms.is_some() {
        return Err(ApiError::BadRequest(
            "timeout_ms is for ask, not send".into(),
        ));
    }
    let opts = SendOptions {
        idempotency_key: c.key,
        delay: c.params.delay_ms.map(Duration::from_millis),
        traceparent: c.traceparent,
    };
    Ok(sent(c.actor.send_json(c.body, opts).await?))
}

fn sent(s: Sent) -> Response {
    match s {
        Sent::Enqueued(id) => (
            StatusCode::ACCEPTED,
            axum::Json(json!({ "message_id": id, "duplicate": false })),
        )
            .into_response(),
        Sent::Duplicate => {
            (StatusCode::OK, axum::Json(json!({ "duplicate": true }))).into_response()
        }
    }
}

async fn ask(
    State(s): State<Ingress>,
    p: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<Params>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (kind, key) = path(p)?;
    let c = s.call(&kind, &key, &headers, query, body).await?;
    if c.params.delay_ms.is_some() {
        return Err(ApiError::BadRequest("delay_ms is for send, not ask".into()));
    }
    let timeout = match c.params.timeout_ms.map(Duration::from_millis) {
        Some(t) if t.is_zero() || t > s.opts.max_ask_timeout => {
            return Err(ApiError::BadRequest(format!(
                "timeout_ms must be between 1 and {}",
                s.opts.max_ask_timeout.as_millis()
            )));
        }
        t => t,
    };
    // The key the message goes under: the caller's, or one made up here (as `ask` would make
    // one up), so that a caller whose ask timed out or met a failing store is told the key to
    // ask again with for its reply, instead of sending the message a second time.
    let key = match c.key {
        Some(k) => k,
        None => IdempotencyKey::new(format!("ask-{}", loom_core::MessageId::new()))
            .map_err(|e| ApiError::Internal(e.to_string()))?,
    };
    let opts = AskOptions {
        idempotency_key: Some(key.clone()),
        timeout,
        traceparent: c.traceparent,
    };
    match c.actor.ask_json(c.body, opts).await {
        Ok(reply) => Ok((StatusCode::OK, axum::Json(reply)).into_response()),
        Err(e) => Ok(match ApiError::from(e) {
            e @ (ApiError::Timeout(_) | ApiError::Unavailable { .. }) => {
                error::Keyed(e, key).into_response()
            }
            e => e.into_response(),
        }),
    }
}

async fn event(
    State(s): State<Ingress>,
    p: Result<Path<(String, String, String)>, PathRejection>,
    query: Result<Query<Params>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (kind, key, name) = p
        .map(|Path(v)| v)
        .map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let c = s.call(&kind, &key, &headers, query, body).await?;
    if c.params.delay_ms.is_some() || c.params.timeout_ms.is_some() {
        return Err(ApiError::BadRequest(
            "an event takes neither delay_ms nor timeout_ms".into(),
        ));
    }
    let opts = EventOptions {
        key: c.key,
        traceparent: c.traceparent,
    };
    Ok(sent(
        c.actor.deliver_event_with(&name, &c.body, opts).await?,
    ))
}

/// The body of a cancel request: which invocation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) enum CancelBody {
    #[serde(rename = "message")]
    Message(loom_core::MessageId),
    #[serde(rename = "key")]
    Key(String),
}

impl CancelBody {
    /// The invocation a cancel request's JSON body names.
    pub(crate) fn target(body: Value) -> Result<CancelTarget, ApiError> {
        let target: CancelBody = serde_json::from_value(body).map_err(|e| {
            ApiError::BadMessage(format!(
                "a cancel names the message, {{\"message\": id}}, or its key, {{\"key\": k}}: {e}"
            ))
        })?;
        Ok(match target {
            CancelBody::Message(id) => CancelTarget::Message(id),
            CancelBody::Key(k) => CancelTarget::Key(
                IdempotencyKey::new(k).map_err(|e| ApiError::BadMessage(format!("key: {e}")))?,
            ),
        })
    }
}

async fn cancel(
    State(s): State<Ingress>,
    p: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<Params>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (kind, key) = path(p)?;
    let c = s.call(&kind, &key, &headers, query, body).await?;
    if c.params.delay_ms.is_some() || c.params.timeout_ms.is_some() || c.key.is_some() {
        return Err(ApiError::BadRequest(
            "a cancel takes neither delay_ms, timeout_ms nor an Idempotency-Key (it may be repeated)"
                .into(),
        ));
    }
    let target = CancelBody::target(c.body)?;
    let found = match target {
        CancelTarget::Message(id) => c.actor.cancel(id).await?,
        CancelTarget::Key(k) => c.actor.cancel_key(&k).await?,
    };
    match found {
        Cancellation::Requested { .. } => Ok((StatusCode::OK, axum::Json(found)).into_response()),
        Cancellation::NotFound => Err(ApiError::NotFound(format!(
            "no such message waits for {}: it finished, was dead-lettered, or never came",
            c.actor.id()
        ))),
    }
}

/// Installs a Prometheus recorder as this process's [`metrics`] recorder, with histogram
/// buckets for Loom's latencies (100 µs to 30 s), and returns the handle [`monitor`] renders.
/// A process has one recorder: call it once, before the runtime starts (the runtime takes its
/// handles from the recorder installed when it starts). A thread runs the exporter's upkeep
/// every 5 s for the life of the process, so that what it keeps between scrapes stays bounded.
pub fn install_prometheus() -> Result<PrometheusHandle, InstallError> {
    const BUCKETS: &[f64] = &[
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0, 30.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets(BUCKETS)?
        .install_recorder()?;
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("loom-prometheus-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(5));
                upkeep.run_upkeep();
            }
        })
        .map_err(InstallError::Upkeep)?;
    Ok(handle)
}

/// Why [`install_prometheus`] failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The recorder could not be built or installed (another is installed already, say).
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The upkeep thread could not be started.
    #[error("could not start the metrics upkeep thread: {0}")]
    Upkeep(std::io::Error),
}

#[derive(Clone)]
struct Monitor {
    rt: Runtime,
    prometheus: PrometheusHandle,
    /// Each hosted kind's backlog reads (see [`reads`]).
    backlogs: std::sync::Arc<
        std::collections::HashMap<
            &'static str,
            std::sync::Arc<reads::Background<loom_core::store::Backlog>>,
        >,
    >,
    /// At most four backlog reads at once: a scrape leaves the store's connections to the
    /// runtime.
    reading: std::sync::Arc<tokio::sync::Semaphore>,
}

/// `GET /metrics` (the Prometheus text format: the runtime's counters and latency histograms
/// per actor kind, see `loom_core::runtime::MetricsSnapshot`, with the gauges of active actors,
/// held leases and store health read at the scrape (labelled by the runtime's `node`), each
/// hosted kind's parked actors read from the store then, within 2 s, and its mailbox backlog
/// read in the background (see `backlogs` in the source: a scrape shows the latest reading,
/// and its age); the runtime records only into a recorder installed
/// before it started, see [`install_prometheus`]) and `GET /health` (`200` with the runtime's
/// [`Health`](loom_core::runtime::Health) as JSON, `503` with it while the store fails, the
/// node's name is another process's, or the runtime is stopping: `"node": {"state":
/// "stopping"}` from the moment `Runtime::shutdown` begins, while sends are refused). Read
/// only, and outside [`router`]'s token: mount it where only the monitoring can reach it, or
/// behind your own layer ([`only_hosts`] keeps a page rebound to a loopback listener out).
pub fn monitor(rt: Runtime, prometheus: PrometheusHandle) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .route("/health", get(health))
        .with_state(Monitor {
            backlogs: std::sync::Arc::new(
                rt.kinds()
                    .into_iter()
                    .map(|k| (k, std::sync::Arc::default()))
                    .collect(),
            ),
            reading: std::sync::Arc::new(tokio::sync::Semaphore::new(4)),
            rt,
            prometheus,
        })
}

/// `router`'s routes answered only under the `Host` names in `hosts` (others get `403
/// forbidden_host`), as [`Options::hosts`] does for the ingress: for routes without that
/// option, such as [`monitor`]'s, on a loopback listener ([`AdminOptions::hosts_for`]). Empty
/// `hosts` serve any name. It covers the routes `router` has (axum refuses a router with
/// none), not those merged in later.
///
/// ```
/// let hosts = loom_http::AdminOptions::hosts_for("127.0.0.1:9000".parse()?);
/// let ping = axum::Router::new().route("/ping", axum::routing::get(|| async { "pong" }));
/// let app: axum::Router = loom_http::only_hosts(ping, hosts);
/// # Ok::<(), std::net::AddrParseError>(())
/// ```
pub fn only_hosts(router: Router, hosts: Vec<String>) -> Router {
    router.route_layer(middleware::from_fn_with_state(
        std::sync::Arc::new(hosts),
        |State(hosts): State<std::sync::Arc<Vec<String>>>, req: Request, next: Next| async move {
            match admin::allowed_host(&hosts, req.headers()) {
                Ok(()) => next.run(req).await,
                Err(e) => e.into_response(),
            }
        },
    ))
}

async fn scrape(State(m): State<Monitor>) -> Response {
    let now = m.rt.metrics();
    // Labelled by node: the gauges of several runtimes in one process (one recorder) are
    // series of their own. (The store's counts below are the same for every runtime on one
    // store, and are not.)
    let node = m.rt.config().node.clone();
    metrics::gauge!("loom_active_actors", "node" => node.clone()).set(now.active as f64);
    metrics::gauge!("loom_leases_held", "node" => node.clone()).set(now.leases_held as f64);
    metrics::gauge!("loom_partitions_owned", "node" => node.clone())
        .set(now.partitions_owned as f64);
    // The store's own health: a node refused its name is not a failing store (`/health` says
    // both). A degraded store (failing in part) counts as healthy, and says so apart.
    let store = m.rt.health().store;
    let (healthy, degraded) = match store {
        loom_core::runtime::StoreHealth::Healthy => (1.0, 0.0),
        loom_core::runtime::StoreHealth::Degraded { .. } => (1.0, 1.0),
        loom_core::runtime::StoreHealth::Failing { .. } => (0.0, 0.0),
    };
    metrics::gauge!("loom_store_healthy", "node" => node.clone()).set(healthy);
    metrics::gauge!("loom_store_degraded", "node" => node.clone()).set(degraded);
    // The store's reads of one scrape answer within 2 s however many kinds there are.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    // At once, each within the bound: a backlog read past it leaves the others their time.
    tokio::join!(
        backlogs(&m, deadline),
        parked(&m.rt, deadline),
        relays(&**m.rt.store(), deadline),
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.prometheus.render(),
    )
        .into_response()
}

/// Sets the per-kind mailbox gauges from the store ([`Mailbox::backlog`]: one pass over the
/// kind's non-empty mailboxes in its ready index, no message read) for every hosted kind.
/// The reads run in the background, at most four at once and one per kind at a time
/// ([`reads`]): a scrape shows a read that ends within its 2 s, or else the latest that ended
/// (`loom_mailbox_backlog_age_seconds` says how old), so that a backlog too long to walk in
/// 2 s is still shown; a read that took a second or more is reused for four times as long, so
/// frequent scrapes do not keep the store walking. A read that failed (or none yet) sets that
/// kind's gauges to NaN and says so in the log; the scrape still answers (with
/// `loom_store_healthy` telling whether the store fails). The counts are the store's, not
/// this node's: every node hosting a kind reports the same, so aggregate them across nodes
/// with `max`, not `sum`.
///
/// [`Mailbox::backlog`]: loom_core::Mailbox::backlog
async fn backlogs(m: &Monitor, deadline: tokio::time::Instant) {
    let reads = m.backlogs.iter().map(|(&kind, background)| async move {
        let store = m.rt.store().clone();
        let read = background
            .read(deadline, &m.reading, move || async move {
                store.backlog(kind).await.map_err(|e| e.to_string())
            })
            .await;
        (kind, read)
    });
    for (kind, read) in futures::future::join_all(reads).await {
        let (waiting, ready, waited, age) = match read {
            Some(reads::Ended {
                value: Ok(b), at, ..
            }) => (
                b.mailboxes as f64,
                b.ready as f64,
                b.longest_wait().as_secs_f64(),
                at.elapsed().as_secs_f64(),
            ),
            Some(reads::Ended { value: Err(e), .. }) => {
                tracing::warn!(kind, error = %e, "could not read the mailbox backlog for /metrics");
                (f64::NAN, f64::NAN, f64::NAN, f64::NAN)
            }
            None => {
                tracing::warn!(
                    kind,
                    "the mailbox backlog for /metrics is still being read, past 2 s, with no recent reading to show"
                );
                (f64::NAN, f64::NAN, f64::NAN, f64::NAN)
            }
        };
        // Unknown (NaN) rather than the last value when the read failed: a dashboard does not
        // show a stale "nothing waits" during an outage.
        metrics::gauge!("loom_mailboxes_waiting", "kind" => kind).set(waiting);
        metrics::gauge!("loom_mailboxes_ready", "kind" => kind).set(ready);
        metrics::gauge!("loom_mailbox_wait_seconds", "kind" => kind).set(waited);
        metrics::gauge!("loom_mailbox_backlog_age_seconds", "kind" => kind).set(age);
    }
}

/// Sets `loom_parked_actors` for every hosted kind: the store's parked actors (each waits for
/// its code to be fixed, so they are few), paged through by the scrape within its deadline;
/// NaN if the store fails or is late. The store's count, like the backlog's.
async fn parked(rt: &Runtime, deadline: tokio::time::Instant) {
    let counts = parked_counts(&**rt.store(), deadline).await;
    for kind in rt.kinds() {
        let n = counts
            .as_ref()
            .map_or(f64::NAN, |c| c.get(kind).map_or(0.0, |n| *n as f64));
        metrics::gauge!("loom_parked_actors", "kind" => kind).set(n);
    }
}

/// The store's parked actors counted per kind, paged through within `deadline`; `None` (and
/// a warning) if the store fails or is late.
async fn parked_counts(
    store: &dyn loom_core::Store,
    deadline: tokio::time::Instant,
) -> Option<std::collections::BTreeMap<String, u64>> {
    let count = loom_core::runtime::parked_per_kind(store);
    match tokio::time::timeout_at(deadline, count).await {
        Ok(Ok(c)) => Some(c),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not read the parked actors for /metrics");
            None
        }
        Err(_) => {
            tracing::warn!("reading the parked actors for /metrics took over 2 s");
            None
        }
    }
}

/// Sets `loom_relay_waiting` per partition of a partitioned store: the messages waiting in its
/// outbox for the relay to move them to other partitions ([`Store::relay_backlog`]; a relay
/// that falls behind shows here). NaN if the store fails or is late; none for a store of one
/// partition.
///
/// [`Store::relay_backlog`]: loom_core::Store::relay_backlog
async fn relays(store: &dyn loom_core::Store, deadline: tokio::time::Instant) {
    let partitions = store.partitions();
    if partitions == 1 {
        return;
    }
    let read = tokio::time::timeout_at(deadline, store.relay_backlog()).await;
    let waiting: Vec<f64> = match read {
        Ok(Ok(b)) => {
            let mut w = vec![f64::NAN; partitions as usize];
            for r in b {
                if let Some(slot) = w.get_mut(r.partition as usize) {
                    *slot = r.waiting as f64;
                }
            }
            w
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not read the relay backlog for /metrics");
            vec![f64::NAN; partitions as usize]
        }
        Err(_) => {
            tracing::warn!("reading the relay backlog for /metrics took over 2 s");
            vec![f64::NAN; partitions as usize]
        }
    };
    for (p, w) in waiting.into_iter().enumerate() {
        metrics::gauge!("loom_relay_waiting", "partition" => p.to_string()).set(w);
    }
}

/// `GET /metrics` and `GET /health` over a store alone, with no runtime (`loom serve`): at
/// each scrape, read from the store within 2 s, `loom_store_healthy` (1 if a read succeeds),
/// `loom_parked_actors` per kind of every parked actor (0 for a kind none of whose actors is
/// parked any more) and, on a store of several partitions, `loom_relay_waiting` per
/// partition. `/health` is `200 {"store": "ok"}`, or `503` with the store's error. The
/// runtime's own counters and latencies are its process's: scrape [`monitor`] there.
pub fn store_monitor(
    store: std::sync::Arc<dyn loom_core::Store>,
    prometheus: PrometheusHandle,
) -> Router {
    Router::new()
        .route("/metrics", get(store_scrape))
        .route("/health", get(store_health))
        .with_state(StoreMonitor {
            store,
            prometheus,
            kinds: Default::default(),
        })
}

#[derive(Clone)]
struct StoreMonitor {
    store: std::sync::Arc<dyn loom_core::Store>,
    prometheus: PrometheusHandle,
    /// The kinds whose parked actors a scrape has counted: each keeps a gauge (0 once none is).
    kinds: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

/// Whether the store answers a read within the deadline; why not if it does not.
async fn store_answers(
    store: &dyn loom_core::Store,
    deadline: tokio::time::Instant,
) -> Result<(), String> {
    match tokio::time::timeout_at(deadline, store.list_actors(None, 1)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(loom_core::explain(&e)),
        Err(_) => Err("the store did not answer within 2 s".into()),
    }
}

async fn store_scrape(State(m): State<StoreMonitor>) -> Response {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let healthy = match store_answers(&*m.store, deadline).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "the store failed the health read of /metrics");
            false
        }
    };
    metrics::gauge!("loom_store_healthy").set(if healthy { 1.0 } else { 0.0 });
    let counts = parked_counts(&*m.store, deadline).await;
    let kinds: Vec<String> = {
        let mut known = m.kinds.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = &counts {
            known.extend(c.keys().cloned());
        }
        known.iter().cloned().collect()
    };
    for kind in kinds {
        let n = counts
            .as_ref()
            .map_or(f64::NAN, |c| c.get(&kind).map_or(0.0, |n| *n as f64));
        metrics::gauge!("loom_parked_actors", "kind" => kind).set(n);
    }
    relays(&*m.store, deadline).await;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.prometheus.render(),
    )
        .into_response()
}

async fn store_health(State(m): State<StoreMonitor>) -> Response {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    match store_answers(&*m.store, deadline).await {
        Ok(()) => (StatusCode::OK, axum::Json(json!({ "store": "ok" }))).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "store": "failing", "error": e })),
        )
            .into_response(),
    }
}

async fn health(State(m): State<Monitor>) -> Response {
    let h = m.rt.health();
    let status = if h.is_healthy() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(h)).into_response()
}
