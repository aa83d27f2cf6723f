//! The admin API: what `loom` shows and does, as JSON over HTTP, over any store and needing no
//! actor code (`loom serve`), or mounted by an application beside its ingress.
//!
//! Reads are open (bind to a trusted address: `loom serve` binds to 127.0.0.1 unless told
//! otherwise); a write (requeue or purge dead letters, unpark an actor, cancel an invocation)
//! needs writes allowed
//! ([`AdminOptions::allow_writes`]) and the bearer token, compared in constant time. Every list
//! is paged on the server (`after` and `limit`, at most [`MAX_PAGE`]), so a store of a hundred
//! thousand actors is browsed a page at a time.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use futures::TryStreamExt;
use loom_core::runtime::{self as rt, Cancellation, StateAtError, state_at};
use loom_core::{ActorId, Seq, SeqRange, Store};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::ApiError;

/// Most items in one page of a list.
pub const MAX_PAGE: usize = 500;

/// About the most bytes of entries read for one page of a journal's summaries
/// (`summary=true`): each is read and decoded whole, so the page ends early once this much was.
const SUMMARIZED_BYTES: usize = 8 * MAX_PAGE_BYTES;

/// About the most bytes of entries in one page of a journal: a page ends early, with its
/// `next`, once its entries' JSON passes this (it holds one entry at least, and an entry is
/// at most 4 MiB encoded), so that a page of large entries is not a gigabyte built in memory.
pub const MAX_PAGE_BYTES: usize = 8 * 1024 * 1024;

/// How the admin API behaves.
#[derive(Debug, Clone, Default)]
pub struct AdminOptions {
    /// Allow the writes (requeue and purge dead letters, unpark an actor, cancel an
    /// invocation). Off by default: the API only reads.
    pub allow_writes: bool,
    /// The bearer token a write must carry; writes are refused without one configured.
    pub token: Option<String>,
    /// The `Host` headers accepted (`localhost:7070`, say); any other request is refused with
    /// `403`, so that a web page the user visits cannot reach a local admin API through a
    /// name it made resolve to 127.0.0.1 (DNS rebinding). Empty: any host.
    pub hosts: Vec<String>,
}

impl AdminOptions {
    /// The host names an admin API listening on `bound` answers to, for
    /// [`hosts`](Self::hosts): on a loopback address its own names (`localhost`, `127.0.0.1`,
    /// `[::1]` with the port, and without it on port 80), so that no other name resolving here
    /// reaches it; on any other address none (any host: put it behind a proxy that checks the
    /// host, and forwards it).
    ///
    /// ```
    /// use loom_http::AdminOptions;
    ///
    /// let local = AdminOptions::hosts_for("127.0.0.1:7070".parse()?);
    /// assert!(local.contains(&"localhost:7070".to_owned()));
    /// assert!(AdminOptions::hosts_for("10.0.0.5:7070".parse()?).is_empty());
    /// # Ok::<(), std::net::AddrParseError>(())
    /// ```
    pub fn hosts_for(bound: std::net::SocketAddr) -> Vec<String> {
        if !bound.ip().is_loopback() {
            return Vec::new();
        }
        let port = bound.port();
        let mut hosts = vec![
            format!("localhost:{port}"),
            format!("127.0.0.1:{port}"),
            format!("[::1]:{port}"),
        ];
        // On port 80 a browser leaves the port out of `Host`.
        if port == 80 {
            hosts.extend(["localhost", "127.0.0.1", "[::1]"].map(String::from));
        }
        if !hosts.contains(&bound.to_string()) {
            hosts.push(bound.to_string());
        }
        hosts
    }
}

#[derive(Clone)]
struct Admin {
    store: Arc<dyn Store>,
    opts: Arc<AdminOptions>,
}

/// The admin API over `store` under `/api`, and Loom Studio (the web page that browses it) at
/// `/`. See the module documentation for the rules on writes.
pub fn admin(store: Arc<dyn Store>, opts: AdminOptions) -> Router {
    let state = Admin {
        store,
        opts: Arc::new(opts),
    };
    Router::new()
        .route("/", get(studio))
        .route("/api/actors", get(actors))
        .route("/api/actors/{kind}/{key}", get(actor))
        .route("/api/actors/{kind}/{key}/journal", get(journal))
        .route("/api/actors/{kind}/{key}/state", get(state_of))
        .route("/api/actors/{kind}/{key}/diff", get(diff))
        .route("/api/actors/{kind}/{key}/mailbox", get(mailbox))
        .route("/api/actors/{kind}/{key}/cancel", post(cancel))
        .route("/api/mailboxes", get(mailboxes))
        .route("/api/deadletters", get(dead_letters))
        .route("/api/deadletters/purge", post(purge_many))
        .route("/api/deadletters/{id}/requeue", post(requeue))
        .route("/api/deadletters/{id}/purge", post(purge))
        .route("/api/parked", get(parked))
        .route("/api/parked/{kind}/{key}/unpark", post(unpark))
        .route_layer(middleware::from_fn_with_state(state.clone(), guard_writes))
        .with_state(state)
}

/// Lets reads through from an accepted host; a write only with writes allowed and the right
/// token. Every answer tells browsers not to frame it, sniff it or send it as a referrer.
async fn guard_writes(State(s): State<Admin>, req: Request, next: Next) -> Response {
    let mut resp = guard(&s, req, next).await;
    let h = resp.headers_mut();
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    resp
}

/// Refuses a request whose `Host` is not one of `hosts`, unless `hosts` is empty.
pub(crate) fn allowed_host(
    hosts: &[String],
    headers: &axum::http::HeaderMap,
) -> Result<(), ApiError> {
    if hosts.is_empty() {
        return Ok(());
    }
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
        Ok(())
    } else {
        Err(ApiError::ForbiddenHost(host.to_owned()))
    }
}

async fn guard(s: &Admin, req: Request, next: Next) -> Response {
    if let Err(e) = allowed_host(&s.opts.hosts, req.headers()) {
        return e.into_response();
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        if !s.opts.allow_writes {
            return ApiError::WritesDisabled.into_response();
        }
        match &s.opts.token {
            Some(token) if crate::authorized(req.headers(), token) => {}
            _ => return ApiError::Unauthorized.into_response(),
        }
    }
    next.run(req).await
}

const STUDIO: &str = include_str!("studio.html");

/// Studio's Content-Security-Policy: only its own inline script and style run (named by their
/// SHA-256), it talks only to its own origin, loads nothing else and is framed by no one. So
/// even a rendering mistake that let a journal's data into the page as markup could not run
/// a script with the token at hand.
fn studio_csp() -> &'static str {
    static CSP: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "default-src 'none'; script-src '{}'; style-src '{}'; connect-src 'self'; \
             img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            inline_hash("script"),
            inline_hash("style")
        )
    });
    &CSP
}

/// `sha256-<base64>` of the text inside the page's one `<tag>…</tag>`.
fn inline_hash(tag: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let body = STUDIO
        .split_once(&open)
        .and_then(|(_, rest)| rest.split_once(&close))
        .map_or("", |(body, _)| body);
    let digest = sha2::Sha256::digest(body.as_bytes());
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

async fn studio() -> Response {
    (
        [(
            axum::http::header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(studio_csp()),
        )],
        Html(STUDIO),
    )
        .into_response()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    after: Option<String>,
    limit: Option<usize>,
}

impl Page {
    fn limit(&self) -> Result<usize, ApiError> {
        page_limit(self.limit)
    }

    /// `after` as a number (a mailbox position, a dead letter's id).
    fn after_number(&self) -> Result<Option<u64>, ApiError> {
        self.after
            .as_deref()
            .map(|s| {
                s.parse()
                    .map_err(|_| ApiError::BadRequest(format!("after {s:?}: not a number")))
            })
            .transpose()
    }
}

fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit {
        None => Ok(100),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::BadRequest(format!(
            "limit {n}: must be between 1 and {MAX_PAGE}"
        ))),
    }
}

/// How many items a byte-bounded page ([`bounded_page`]) reads first, before it knows how
/// large they are.
const FIRST_READ: usize = 4;

/// A page of at most `limit` items after `after`, read through `fetch(after, n)` a few at a
/// time, that ends once it holds more than [`MAX_PAGE_BYTES`] as encoded: a message or a dead
/// letter is up to a MiB, so 500 whole ones took gigabytes to read and answer (their JSON
/// decoded is larger still), on an open read. After a first read of [`FIRST_READ`], each read
/// asks for what the room left holds at the largest item seen. Returns the items, and the
/// length [`paged`] is to take as a full page's: theirs if the page is full (more may follow
/// its last item), `limit` if the store had no more.
async fn bounded_page<T, Fut>(
    limit: usize,
    mut after: Option<u64>,
    key: impl Fn(&T) -> u64,
    mut fetch: impl FnMut(Option<u64>, usize) -> Fut,
) -> Result<(Vec<T>, usize), ApiError>
where
    T: serde::Serialize,
    Fut: std::future::Future<Output = Result<Vec<T>, loom_core::StoreError>>,
{
    let (mut items, mut bytes, mut largest) = (Vec::new(), 0usize, 0usize);
    while items.len() < limit && bytes <= MAX_PAGE_BYTES {
        let left = limit - items.len();
        // Nothing seen yet (largest 0): the first read.
        let n = match (MAX_PAGE_BYTES - bytes).checked_div(largest) {
            None => left.min(FIRST_READ),
            Some(room) => left.min(room.max(1)),
        };
        let got = fetch(after, n).await?;
        let short = got.len() < n;
        for item in got {
            let size = serde_json::to_vec(&item)
                .map_err(|e| ApiError::Internal(format!("an item of the page: {e}")))?
                .len();
            largest = largest.max(size);
            bytes += size;
            after = Some(key(&item));
            items.push(item);
        }
        if short {
            // The store has no more: a page whose length says it is not full.
            return Ok((items, limit));
        }
    }
    let full = items.len();
    Ok((items, full))
}

/// A page of a list: its items, and where the next page starts (`null` when this one was not
/// full, so there is none).
fn paged<T: serde::Serialize, N: serde::Serialize>(
    items: &[T],
    limit: usize,
    next: impl FnOnce(&T) -> N,
) -> Response {
    let next = (items.len() == limit)
        .then(|| items.last().map(next))
        .flatten();
    axum::Json(json!({ "items": items, "next": next })).into_response()
}

fn query<T: Default>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::BadRequest(format!("query: {}", e.body_text())))
}

/// The actor a path names. Loom's own mailboxes (kinds starting with `_`) are named too, as
/// `loom` names them: an operator inspects and repairs those through the store either way.
fn actor_id(p: Result<Path<(String, String)>, PathRejection>) -> Result<ActorId, ApiError> {
    let Path((kind, key)) = p.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if kind.contains('/') {
        return Err(ApiError::BadKey(format!("kind {kind:?} holds a '/'")));
    }
    parse_actor(&format!("{kind}/{key}"))
}

fn parse_actor(s: &str) -> Result<ActorId, ApiError> {
    s.parse()
        .map_err(|e| ApiError::BadKey(format!("{s:?}: {e} (expected kind/key)")))
}

async fn info_json(store: &dyn Store, a: &ActorId) -> Result<Value, ApiError> {
    let info = store.info(a).await?;
    Ok(json!({
        "actor": a.as_str(), "kind": a.kind(), "key": a.key(),
        "highest": info.highest, "trimmed_through": info.trimmed_through,
        "entries": info.len(), "snapshots": info.snapshots,
    }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActorsPage {
    after: Option<String>,
    limit: Option<usize>,
    prefix: Option<String>,
}

/// Where a search by `prefix` begins: `kind/key-prefix` (or a whole `kind`) names the first id
/// it can match; every id it matches is at or after that one in id order (a key holds no
/// control character, so `" "` is the least key).
fn search_start(prefix: &str) -> Result<(ActorId, String), ApiError> {
    let (kind, key) = prefix.split_once('/').unwrap_or((prefix, ""));
    let first = parse_actor(&format!(
        "{kind}/{}",
        if key.is_empty() { " " } else { key }
    ))
    .map_err(|_| {
        ApiError::BadKey(format!(
            "search {prefix:?}: give a kind, or kind/ and the start of a key"
        ))
    })?;
    Ok((first, format!("{kind}/{key}")))
}

/// Actors with a journal, in id order, a page at a time; with `prefix` (`kind/key-prefix`, or
/// a whole kind), only those whose id starts with it: a search that reads no further than
/// its matches (ids sort together).
async fn actors(
    State(s): State<Admin>,
    q: Result<Query<ActorsPage>, QueryRejection>,
) -> Result<Response, ApiError> {
    let page = query(q)?;
    let limit = page_limit(page.limit)?;
    let mut after = page.after.as_deref().map(parse_actor).transpose()?;
    let mut ids = Vec::with_capacity(limit);
    let matches = match page.prefix.as_deref() {
        None => None,
        Some(prefix) => {
            let (first, text) = search_start(prefix)?;
            // An `after` before the matches begin is no later than their start.
            if after.as_ref().is_some_and(|a| a.as_str() < first.as_str()) {
                after = None;
            }
            if after.is_none() {
                // The first id it can match is itself listed only after it: look at it here.
                if s.store.info(&first).await?.highest > 0 {
                    ids.push(first.clone());
                }
                after = Some(first);
            }
            Some(text)
        }
    };
    let listed = s
        .store
        .list_actors(after.as_ref(), limit - ids.len())
        .await?;
    let full = listed.len() == limit - ids.len();
    let mut ended = false;
    for a in listed {
        if matches
            .as_deref()
            .is_some_and(|m| !a.as_str().starts_with(m))
        {
            // Past the matches: none come after.
            ended = true;
            break;
        }
        ids.push(a);
    }
    let mut items = Vec::with_capacity(ids.len());
    for a in &ids {
        items.push(info_json(&*s.store, a).await?);
    }
    let next = (full && !ended)
        .then(|| ids.last().map(|a| a.as_str().to_owned()))
        .flatten();
    Ok(axum::Json(json!({ "items": items, "next": next })).into_response())
}

async fn actor(
    State(s): State<Admin>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let a = actor_id(p)?;
    let mut v = info_json(&*s.store, &a).await?;
    let pending = s.store.pending(&a).await?;
    if v["highest"] == 0 && pending == 0 {
        return Err(ApiError::NotFound(format!(
            "{a} has no journal and no waiting message"
        )));
    }
    v["pending"] = json!(pending);
    v["parked"] = json!(s.store.parked(&a).await?);
    Ok(axum::Json(v).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct JournalPage {
    from: Option<Seq>,
    limit: Option<usize>,
    /// Each entry as `{seq, at, kind: {type}}` only: a timeline's rows, without the data an
    /// entry may carry (megabytes of a reply or an activity's output).
    summary: Option<bool>,
}

async fn journal(
    State(s): State<Admin>,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Result<Query<JournalPage>, QueryRejection>,
) -> Result<Response, ApiError> {
    let a = actor_id(p)?;
    let q = query(q)?;
    let limit = page_limit(q.limit)?;
    let from = q.from.unwrap_or(1).max(1);
    let summary = q.summary.unwrap_or(false);
    let mut read = s
        .store
        .read(&a, SeqRange::all().from(from).max(limit as u64));
    // `bytes`: the page's; `read_bytes`: the entries' whole, which bounds a page of summaries too
    // (each entry is read and decoded whole to be summarised).
    let (mut entries, mut summaries) = (Vec::new(), Vec::new());
    let (mut bytes, mut read_bytes) = (0, 0);
    while bytes <= MAX_PAGE_BYTES
        && read_bytes <= SUMMARIZED_BYTES
        && let Some(e) = read.try_next().await?
    {
        let whole = serde_json::to_vec(&e)
            .map_err(|err| ApiError::Internal(format!("entry {} of {a}: {err}", e.seq)))?
            .len();
        read_bytes += whole;
        if summary {
            let s = json!({ "seq": e.seq, "at": e.at, "kind": { "type": e.kind.name() } });
            bytes += s.to_string().len();
            summaries.push(s);
        } else {
            bytes += whole;
            entries.push(e);
        }
    }
    // A page cut short by its bytes is full: the rest follows from its last entry.
    let cut = bytes > MAX_PAGE_BYTES || read_bytes > SUMMARIZED_BYTES;
    let full = |n: usize| if cut { n } else { limit };
    Ok(if summary {
        paged(&summaries, full(summaries.len()), |s| {
            s["seq"].as_u64().map(|seq| seq + 1)
        })
    } else {
        paged(&entries, full(entries.len()), |e| e.seq + 1)
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AtSeq {
    seq: Option<Seq>,
}

async fn state_of(
    State(s): State<Admin>,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Result<Query<AtSeq>, QueryRejection>,
) -> Result<Response, ApiError> {
    let a = actor_id(p)?;
    let seq = match query(q)?.seq {
        Some(seq) => seq,
        None => s.store.info(&a).await?.highest,
    };
    let at = state_at(&*s.store, &a, seq).await?;
    Ok(axum::Json(at).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Between {
    from: Option<Seq>,
    to: Option<Seq>,
}

async fn diff(
    State(s): State<Admin>,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Result<Query<Between>, QueryRejection>,
) -> Result<Response, ApiError> {
    let a = actor_id(p)?;
    let q = query(q)?;
    let (Some(from), Some(to)) = (q.from, q.to) else {
        return Err(ApiError::BadRequest("a diff needs from and to".into()));
    };
    let old = state_at(&*s.store, &a, from).await?;
    let new = state_at(&*s.store, &a, to).await?;
    let patch = json_patch::diff(&old.state, &new.state);
    Ok(axum::Json(json!({ "from": old, "to": new, "patch": patch })).into_response())
}

async fn mailbox(
    State(s): State<Admin>,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Result<Query<Page>, QueryRejection>,
) -> Result<Response, ApiError> {
    let a = actor_id(p)?;
    let page = query(q)?;
    let limit = page.limit()?;
    let store = &s.store;
    let (items, full) = bounded_page(
        limit,
        page.after_number()?,
        |w: &loom_core::Waiting| w.position,
        |after, n| store.messages(&a, after, n),
    )
    .await?;
    Ok(paged(&items, full, |w| w.position))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MailboxPage {
    after: Option<String>,
    limit: Option<usize>,
    kind: Option<String>,
}

/// Actors with waiting messages (the runtime's own lanes included: `loom mailbox ls` leaves
/// them out), each with how many wait and whether it is parked; `kind` keeps one kind's. With
/// a kind, one request looks at no more than [`MAX_PAGE`] × 10 mailboxes, so its page may be
/// short, even empty, with a `next` to go on from: follow `next` until it is `null`.
async fn mailboxes(
    State(s): State<Admin>,
    q: Result<Query<MailboxPage>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let limit = page_limit(q.limit)?;
    let mut after = q.after.as_deref().map(parse_actor).transpose()?;
    let mut items = Vec::with_capacity(limit);
    let mut looked = 0;
    // Read on past other kinds' mailboxes until the page is full, the mailboxes end (then
    // there is no next page), or the bound on one request's work is reached.
    let more = 'pages: loop {
        // With a kind, the store is read a full page at a time (most may be other kinds').
        let read = if q.kind.is_some() { MAX_PAGE } else { limit };
        let page = s.store.mailboxes(after.as_ref(), read).await?;
        let full = page.len() == read;
        for a in page {
            looked += 1;
            after = Some(a.clone());
            if q.kind.as_deref().is_some_and(|k| a.kind() != k) {
                continue;
            }
            items.push(json!({
                "actor": a.as_str(),
                "pending": s.store.pending(&a).await?,
                "parked": s.store.parked(&a).await?.is_some(),
            }));
            if items.len() == limit {
                break 'pages true;
            }
        }
        if !full {
            break false;
        }
        if looked >= MAX_PAGE * 10 {
            break true;
        }
    };
    let next = more.then(|| after.map(|a| a.as_str().to_owned())).flatten();
    Ok(axum::Json(json!({ "items": items, "next": next })).into_response())
}

/// Cancels the invocation of a waiting message: `{"message": id}` or `{"key": k}`, over the
/// store, as `loom mailbox cancel` does: a wait that is suspended ends at once; one held in a
/// node's memory ends when it next tries to suspend (after `Config::suspend_after`) or at its
/// next wait. (The ingress's cancel, through the runtime, also ends one held in its own
/// process at once.)
async fn cancel(
    State(s): State<Admin>,
    p: Result<Path<(String, String)>, PathRejection>,
    body: Result<axum::Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let a = actor_id(p)?;
    let target = crate::CancelBody::target(json_body(body)?)?;
    match rt::cancel(&*s.store, &a, &target).await? {
        found @ Cancellation::Requested { .. } => {
            tracing::info!(actor = %a, "cancel asked over the admin API");
            Ok(axum::Json(found).into_response())
        }
        Cancellation::NotFound => Err(ApiError::NotFound(format!(
            "no such message waits for {a}: it finished, was dead-lettered, or never came"
        ))),
    }
}

/// A write's JSON body; one sent without `Content-Type: application/json` is `415 not_json`, as
/// the ingress answers it, and one that does not parse `400 bad_message`.
fn json_body(body: Result<axum::Json<Value>, JsonRejection>) -> Result<Value, ApiError> {
    body.map(|axum::Json(v)| v).map_err(|e| match e {
        JsonRejection::MissingJsonContentType(_) => ApiError::NotJson,
        e => ApiError::BadMessage(e.body_text()),
    })
}

async fn dead_letters(
    State(s): State<Admin>,
    q: Result<Query<Page>, QueryRejection>,
) -> Result<Response, ApiError> {
    let page = query(q)?;
    let limit = page.limit()?;
    let store = &s.store;
    let (items, full) = bounded_page(
        limit,
        page.after_number()?,
        |d: &loom_core::DeadLetter| d.id,
        |after, n| store.dead_letters(after, n),
    )
    .await?;
    Ok(paged(&items, full, |d| d.id))
}

fn dead_letter_id(p: Result<Path<u64>, PathRejection>) -> Result<u64, ApiError> {
    p.map(|Path(id)| id)
        .map_err(|e| ApiError::BadRequest(e.body_text()))
}

async fn requeue(
    State(s): State<Admin>,
    p: Result<Path<u64>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = dead_letter_id(p)?;
    let position = s.store.requeue_dead_letter(id).await?;
    tracing::info!(
        dead_letter = id,
        position,
        "dead letter requeued over the admin API"
    );
    Ok(axum::Json(json!({ "requeued": id, "position": position })).into_response())
}

async fn purge(
    State(s): State<Admin>,
    p: Result<Path<u64>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = dead_letter_id(p)?;
    // As `loom deadletters purge` does: a key the dead letter still holds is settled first, so
    // that a caller asking again learns that the message failed. On a task of its own, as a
    // bulk purge: a client that gives up waiting does not stop it between the two.
    let store = s.store.clone();
    let purged =
        tokio::spawn(async move { rt::purge_dead_letter_ids(&*store, &[id], reply_ttl()).await })
            .await
            .map_err(|e| ApiError::Internal(format!("the purge stopped: {e}")))??;
    if purged == 0 {
        return Err(ApiError::NotFound(format!("no dead letter {id}")));
    }
    tracing::info!(dead_letter = id, "dead letter purged over the admin API");
    Ok(axum::Json(json!({ "purged": id })).into_response())
}

/// How long a purged dead letter's failure answers a caller asking again with its key: the
/// runtime's default reply TTL, as `loom deadletters purge` uses.
fn reply_ttl() -> std::time::Duration {
    rt::Config::default().reply_ttl
}

/// Which dead letters a bulk purge deletes: exactly one of these.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
enum PurgeBody {
    /// Those given up on before this time (milliseconds since the Unix epoch).
    #[serde(rename = "before_ms")]
    Before(u64),
    /// These (an id that is not a dead letter is skipped).
    #[serde(rename = "ids")]
    Ids(Vec<u64>),
    /// All of them (`true`).
    #[serde(rename = "all")]
    All(bool),
}

/// Purges many dead letters: `{"before_ms": t}`, `{"ids": [..]}` or `{"all": true}`.
async fn purge_many(
    State(s): State<Admin>,
    body: Result<axum::Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let body: PurgeBody = serde_json::from_value(json_body(body)?).map_err(|e| {
        ApiError::BadMessage(format!(
            "a purge names {{\"before_ms\": t}}, {{\"ids\": [..]}} or {{\"all\": true}}: {e}"
        ))
    })?;
    let store = s.store.clone();
    let (before, ids) = match body {
        PurgeBody::Before(ms) => (Some(loom_core::Timestamp::from_millis(ms)), None),
        PurgeBody::Ids(ids) => (None, Some(ids)),
        PurgeBody::All(true) => (None, None),
        PurgeBody::All(false) => {
            return Err(ApiError::BadMessage(
                "{\"all\": false} purges nothing; name what to purge".into(),
            ));
        }
    };
    // On a task of its own: a client that gives up waiting does not stop it halfway between
    // settling a key and deleting its dead letter.
    let purge = tokio::spawn(async move {
        match &ids {
            Some(ids) => rt::purge_dead_letter_ids(&*store, ids, reply_ttl()).await,
            None => rt::purge_dead_letters(&*store, before, reply_ttl()).await,
        }
    });
    let purged = purge
        .await
        .map_err(|e| ApiError::Internal(format!("the purge stopped: {e}")))??;
    tracing::info!(purged, "dead letters purged over the admin API");
    Ok(axum::Json(json!({ "purged": purged })).into_response())
}

async fn parked(
    State(s): State<Admin>,
    q: Result<Query<Page>, QueryRejection>,
) -> Result<Response, ApiError> {
    let page = query(q)?;
    let limit = page.limit()?;
    let after = page.after.as_deref().map(parse_actor).transpose()?;
    let items: Vec<Value> = s
        .store
        .parked_actors(after.as_ref(), limit)
        .await?
        .into_iter()
        .map(|(a, park)| json!({ "actor": a.as_str(), "park": park }))
        .collect();
    Ok(paged(&items, limit, |p| p["actor"].clone()))
}

async fn unpark(
    State(s): State<Admin>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let a = actor_id(p)?;
    match s.store.unpark(&a).await? {
        Some(park) => {
            tracing::info!(actor = %a, "unparked over the admin API");
            Ok(axum::Json(json!({ "unparked": a.as_str(), "park": park })).into_response())
        }
        None => Err(ApiError::NotFound(format!("{a} is not parked"))),
    }
}

impl From<StateAtError> for ApiError {
    fn from(e: StateAtError) -> Self {
        match e {
            StateAtError::Store(s) => s.into(),
            e @ (StateAtError::Beyond { .. }
            | StateAtError::Trimmed { .. }
            | StateAtError::NoJournal(_)
            | StateAtError::Deleted { .. }) => ApiError::NotFound(e.to_string()),
            e @ StateAtError::Unrecoverable { .. } => ApiError::Internal(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The policy names the page's one inline script and one inline style (plain tags, so
    /// that the text hashed is the text the browser hashes); a second one would be blocked.
    #[test]
    fn the_policy_hashes_the_one_script_and_the_one_style() {
        for tag in ["script", "style"] {
            assert_eq!(STUDIO.matches(&format!("<{tag}")).count(), 1, "<{tag}");
            assert_eq!(STUDIO.matches(&format!("<{tag}>")).count(), 1, "<{tag}>");
        }
        let csp = studio_csp();
        assert!(
            csp.contains(&format!("script-src '{}'", inline_hash("script"))),
            "{csp}"
        );
        assert!(
            csp.contains(&format!("style-src '{}'", inline_hash("style"))),
            "{csp}"
        );
        assert_ne!(inline_hash("script"), inline_hash("nothing"));
    }
}
