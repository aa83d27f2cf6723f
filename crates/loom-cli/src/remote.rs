//! `--url`: a running application's admin API (`loom_http::admin`, or `loom serve`) as the
//! place a command reads and writes. An embedded store is locked by the process that runs it,
//! so `loom` reaches its journals through that process instead of opening its directory.
//!
//! Each method is one endpoint of the admin API, its JSON decoded into the types the store
//! itself returns, so that a command prints the same thing either way. A write carries the
//! bearer token from `LOOM_TOKEN`, and only a write: never in cleartext to another machine
//! (over `http://`, only to a loopback address).

use loom_core::runtime::{CancelTarget, Cancellation};
use loom_core::{ActorId, DeadLetter, Entry, JournalInfo, Park, Seq, Timestamp, Waiting};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::output::Failure;

/// Most items the admin API returns in one page (`loom_http::MAX_PAGE`).
const PAGE: usize = 500;

/// How long a read may take (a page of a list).
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// How long a write may take: a purge of every dead letter is one request.
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// A running application's admin API.
pub struct Remote {
    base: reqwest::Url,
    /// `base` without credentials, for messages.
    label: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// One actor in the admin API's listings.
// Ids decode as `ActorId` (checked as the store checks them): a bad one is an answer that is
// not what the admin API sends.
#[derive(Deserialize)]
struct ActorInfo {
    actor: ActorId,
    highest: Seq,
    trimmed_through: Seq,
    snapshots: Vec<Seq>,
    #[serde(default)]
    pending: u64,
}

impl ActorInfo {
    fn info(&self) -> JournalInfo {
        JournalInfo {
            highest: self.highest,
            trimmed_through: self.trimmed_through,
            snapshots: self.snapshots.clone(),
        }
    }
}

#[derive(Deserialize)]
struct Page<T> {
    items: Vec<T>,
    next: Option<Value>,
}

/// A mailbox in the admin API's listing.
#[derive(Deserialize)]
pub struct MailboxItem {
    /// The actor.
    pub actor: ActorId,
    /// Messages waiting.
    pub pending: u64,
    /// Whether it is parked.
    pub parked: bool,
}

#[derive(Deserialize)]
struct ParkedItem {
    actor: ActorId,
    park: Park,
}

/// A failed request: the admin API's error, or no answer at all.
enum Refusal {
    /// The admin API answered with its error body.
    Api {
        code: String,
        message: String,
        hint: Option<String>,
    },
    /// Anything else (no connection, not the admin API, a body that does not decode).
    Other(Failure),
}

impl From<Refusal> for Failure {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Api {
                code,
                message,
                hint,
                ..
            } => {
                let hint = hint.or_else(|| match code.as_str() {
                    "unauthorized" => {
                        Some("set LOOM_TOKEN to the token the application checks for writes".into())
                    }
                    _ => None,
                });
                match hint {
                    Some(h) => Failure(format!("{message}\nwhat to do: {h}")),
                    None => Failure(message),
                }
            }
            Refusal::Other(f) => f,
        }
    }
}

impl Remote {
    /// The admin API at `url` (`http://host:port`, or with a path prefix where it is mounted
    /// under one), with the write token from `LOOM_TOKEN` if set.
    pub fn new(url: &str) -> Result<Self, Failure> {
        // As given, for messages: credentials never printed (and refused below).
        let shown = loom_cli::store::without_credentials(url);
        let mut base = reqwest::Url::parse(url).map_err(|e| {
            Failure(format!(
                "--url {shown:?} is not a URL ({e}); give the application's address, as in http://127.0.0.1:8080"
            ))
        })?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(Failure(format!(
                "--url {shown:?}: expected an http:// or https:// address of a running application (or of `loom serve`)"
            )));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(Failure(format!(
                "--url {shown:?}: give the address without a query or fragment"
            )));
        }
        // reqwest would send them as Basic authorization with every request, reads included.
        if !base.username().is_empty() || base.password().is_some() {
            return Err(Failure(format!(
                "--url {shown:?}: give the address without a user or password\nwhat to do: a write carries the token from LOOM_TOKEN"
            )));
        }
        // Endpoints are joined below the given path: make it end with `/`.
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let token = match std::env::var("LOOM_TOKEN") {
            Ok(t) if t.is_empty() => None,
            Ok(t) => Some(t),
            Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(Failure("LOOM_TOKEN is not valid UTF-8".into()));
            }
        };
        // The admin API never redirects: an answer that does is not from it, and a redirect
        // must not carry the token elsewhere. This machine's own address goes to no proxy
        // (HTTP_PROXY), which would otherwise see the token in cleartext.
        let mut http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none());
        if is_loopback(&base) {
            http = http.no_proxy();
        }
        let http = http
            .build()
            .map_err(|e| Failure(format!("cannot start an HTTP client: {e}")))?;
        Ok(Remote {
            label: base.to_string(),
            base,
            token,
            http,
        })
    }

    /// The address, for messages (it holds no credentials: [`Remote::new`] refuses them).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The token for a write: refused in cleartext to another machine.
    fn token_for_write(&self) -> Result<Option<&str>, Refusal> {
        let Some(token) = self.token.as_deref() else {
            return Ok(None);
        };
        if self.base.scheme() == "http" && !is_loopback(&self.base) {
            return Err(Refusal::Other(Failure(format!(
                "refusing to send LOOM_TOKEN in cleartext to {}\nwhat to do: reach the application over https:// (a proxy in front of it), or on a loopback address (an SSH tunnel)",
                self.label
            ))));
        }
        Ok(Some(token))
    }

    /// `api/<segments…>` below the base, each segment percent-encoded (a key may hold `/`).
    /// A segment `.` or `..` cannot be sent (URLs resolve it away), so it is refused.
    fn url(&self, segments: &[&str]) -> Result<reqwest::Url, Refusal> {
        if let Some(dots) = segments.iter().find(|s| matches!(**s, "." | "..")) {
            return Err(Refusal::Other(Failure(format!(
                "{dots:?} cannot be named in a URL's path, so not through --url\nwhat to do: use --store for this actor"
            ))));
        }
        let mut u = self.base.clone();
        u.path_segments_mut()
            .expect("Remote::new refuses a URL that cannot be a base")
            // The base ends with `/`: drop its empty last segment before pushing.
            .pop_if_empty()
            .push("api")
            .extend(segments);
        Ok(u)
    }

    fn actor_segments(a: &ActorId) -> [&str; 3] {
        ["actors", a.kind(), a.key()]
    }

    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        write: bool,
    ) -> Result<T, Refusal> {
        // The token only with a write (and refused in cleartext to another machine).
        let (timeout, req) = match write {
            true => match self.token_for_write()? {
                Some(t) => (WRITE_TIMEOUT, req.bearer_auth(t)),
                None => (WRITE_TIMEOUT, req),
            },
            false => (READ_TIMEOUT, req),
        };
        let failed = |e: reqwest::Error| {
            let why = causes(&e);
            // A request that never connected did nothing; one that did and then failed (no
            // answer in time, the connection lost) may have done its write.
            let text = if e.is_connect() {
                format!(
                    "cannot reach the admin API at {}: {why}\nwhat to do: check that the application runs and serves its admin API there (the bank's --listen, `loom serve`)",
                    self.label
                )
            } else if write {
                format!(
                    "no answer from the admin API at {} to a write: {why}\nwhat to do: the write may have been done, in part or whole; look before doing it again",
                    self.label
                )
            } else if e.is_timeout() {
                format!(
                    "the admin API at {} did not answer within {} s: {why}",
                    self.label,
                    timeout.as_secs()
                )
            } else {
                format!("the admin API at {} failed to answer: {why}", self.label)
            };
            Refusal::Other(Failure(text))
        };
        let resp = req.timeout(timeout).send().await.map_err(failed)?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(failed)?;
        if status.is_success() {
            return serde_json::from_slice(&body).map_err(|e| {
                Refusal::Other(Failure(format!(
                    "the answer from {} is not what Loom's admin API sends ({e}): is --url the address of a Loom application?",
                    self.label
                )))
            });
        }
        #[derive(Deserialize)]
        struct ErrorBody {
            error: String,
            message: String,
            hint: Option<String>,
        }
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => Err(Refusal::Api {
                code: e.error,
                message: e.message,
                hint: e.hint,
            }),
            Err(_) => Err(Refusal::Other(Failure(format!(
                "{} answered {status} without Loom's error body: is --url the address of a Loom application serving its admin API (and of a version that has this endpoint)?",
                self.label
            )))),
        }
    }

    async fn get<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
    ) -> Result<T, Refusal> {
        self.send(self.http.get(self.url(segments)?).query(query), false)
            .await
    }

    async fn post<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: Value,
    ) -> Result<T, Refusal> {
        self.send(self.http.post(self.url(segments)?).json(&body), true)
            .await
    }

    /// Every item of a paged list, following `next`.
    async fn all<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
    ) -> Result<Vec<T>, Failure> {
        let mut items = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut q = query.to_vec();
            q.push(("limit", PAGE.to_string()));
            if let Some(a) = &after {
                q.push(("after", a.clone()));
            }
            let page: Page<T> = self.get(segments, &q).await?;
            items.extend(page.items);
            let next = match page.next {
                None | Some(Value::Null) => return Ok(items),
                Some(Value::String(s)) => s,
                Some(other) => other.to_string(),
            };
            if after.as_ref() == Some(&next) {
                return Err(Failure(format!(
                    "{} gave the same page twice (next {next:?}); stopping",
                    self.label
                )));
            }
            after = Some(next);
        }
    }

    /// Every actor with a journal, and what its journal holds.
    pub async fn journals(&self) -> Result<Vec<(ActorId, JournalInfo)>, Failure> {
        let items: Vec<ActorInfo> = self.all(&["actors"], &[]).await?;
        Ok(items
            .into_iter()
            .map(|i| (i.actor.clone(), i.info()))
            .collect())
    }

    /// What an actor's journal holds, and how many messages wait for it (nothing of either
    /// for an actor the store does not know).
    pub async fn actor(&self, a: &ActorId) -> Result<(JournalInfo, u64), Failure> {
        match self.get::<ActorInfo>(&Self::actor_segments(a), &[]).await {
            Ok(i) => Ok((i.info(), i.pending)),
            Err(Refusal::Api { code, .. }) if code == "not_found" => {
                Ok((JournalInfo::default(), 0))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The entries of `a` from `from` to `to`, handed to `each` a page at a time.
    pub async fn entries(
        &self,
        a: &ActorId,
        from: Seq,
        to: Seq,
        mut each: impl FnMut(Entry) -> Result<(), Failure>,
    ) -> Result<(), Failure> {
        let [s0, s1, s2] = Self::actor_segments(a);
        let mut from = from;
        loop {
            let q = [("from", from.to_string()), ("limit", PAGE.to_string())];
            let page: Page<Entry> = self.get(&[s0, s1, s2, "journal"], &q).await?;
            for e in page.items {
                if e.seq > to {
                    return Ok(());
                }
                each(e)?;
            }
            from = match page.next {
                None | Some(Value::Null) => return Ok(()),
                Some(next) => match next.as_u64() {
                    Some(n) if n > from => n,
                    _ => {
                        return Err(Failure(format!(
                            "{} gave a journal page whose next seq is {next} after {from}",
                            self.label
                        )));
                    }
                },
            };
        }
    }

    /// The messages waiting for `a`, in order.
    pub async fn messages(&self, a: &ActorId) -> Result<Vec<Waiting>, Failure> {
        let [s0, s1, s2] = Self::actor_segments(a);
        self.all(&[s0, s1, s2, "mailbox"], &[]).await
    }

    /// Actors with waiting messages (only of `kind`, if given).
    pub async fn mailboxes(&self, kind: Option<&str>) -> Result<Vec<MailboxItem>, Failure> {
        let q: Vec<(&str, String)> = kind.map(|k| ("kind", k.to_owned())).into_iter().collect();
        self.all(&["mailboxes"], &q).await
    }

    /// Up to `limit` dead letters after `after`, oldest first.
    pub async fn dead_letters(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, Failure> {
        let mut all: Vec<DeadLetter> = Vec::new();
        let mut after = after;
        while all.len() < limit {
            let n = (limit - all.len()).min(PAGE);
            let mut q = vec![("limit", n.to_string())];
            if let Some(a) = after {
                q.push(("after", a.to_string()));
            }
            let page: Page<DeadLetter> = self.get(&["deadletters"], &q).await?;
            // The end is where `next` is null: a page of large dead letters ends early, at
            // the server's page bytes, with `next` to go on from.
            let end = matches!(page.next, None | Some(Value::Null)) || page.items.is_empty();
            after = page.items.last().map(|d| d.id).or(after);
            all.extend(page.items);
            if end {
                break;
            }
        }
        Ok(all)
    }

    /// Puts a dead letter back in its mailbox; returns its position there.
    pub async fn requeue(&self, id: u64) -> Result<u64, Failure> {
        #[derive(Deserialize)]
        struct Requeued {
            position: u64,
        }
        let r: Requeued = self
            .post(&["deadletters", &id.to_string(), "requeue"], json!({}))
            .await?;
        Ok(r.position)
    }

    /// Purges the dead letters given up on before `before`, these `ids`, or (neither) all.
    pub async fn purge(&self, before: Option<Timestamp>, ids: &[u64]) -> Result<u64, Failure> {
        #[derive(Deserialize)]
        struct Purged {
            purged: u64,
        }
        let body = match (before, ids) {
            (Some(b), _) => json!({ "before_ms": b.as_millis() }),
            (None, []) => json!({ "all": true }),
            (None, ids) => json!({ "ids": ids }),
        };
        let r: Purged = self.post(&["deadletters", "purge"], body).await?;
        Ok(r.purged)
    }

    /// Every parked actor.
    pub async fn parked(&self) -> Result<Vec<(ActorId, Park)>, Failure> {
        let items: Vec<ParkedItem> = self.all(&["parked"], &[]).await?;
        Ok(items.into_iter().map(|p| (p.actor, p.park)).collect())
    }

    /// Unparks `a`; `None` if it was not parked.
    pub async fn unpark(&self, a: &ActorId) -> Result<Option<Park>, Failure> {
        #[derive(Deserialize)]
        struct Unparked {
            park: Park,
        }
        match self
            .post::<Unparked>(&["parked", a.kind(), a.key(), "unpark"], json!({}))
            .await
        {
            Ok(u) => Ok(Some(u.park)),
            Err(Refusal::Api { code, .. }) if code == "not_found" => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Asks that an invocation of `a` be cancelled.
    pub async fn cancel(
        &self,
        a: &ActorId,
        target: &CancelTarget,
    ) -> Result<Cancellation, Failure> {
        let body = match target {
            CancelTarget::Message(m) => json!({ "message": m }),
            CancelTarget::Key(k) => json!({ "key": k.as_str() }),
        };
        let [s0, s1, s2] = Self::actor_segments(a);
        match self.post(&[s0, s1, s2, "cancel"], body).await {
            Ok(c) => Ok(c),
            Err(Refusal::Api { code, .. }) if code == "not_found" => Ok(Cancellation::NotFound),
            Err(e) => Err(e.into()),
        }
    }
}

/// An error and its causes, outermost first (reqwest's own text leaves out the cause: a
/// refused connection, a name that does not resolve, a certificate refused).
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Whether `url` names this machine (`localhost`, 127.0.0.0/8, `[::1]`).
fn is_loopback(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d
            .strip_suffix('.')
            .unwrap_or(d)
            .eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}
