//! [`ApiError`]: every way a request fails, each with its status and a JSON body.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use loom_core::StoreError;
use loom_core::runtime::{AskError, SendError};
use serde_json::{Value, json};

/// Why a request failed. The response is `{"error": code, "message": text}` (plus `hint`
/// where Loom knows what to do, and `reason`/`value` for a rejection), with the status below.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// `400 bad_request`: a malformed path, query or header (an invalid `Idempotency-Key`).
    #[error("{0}")]
    BadRequest(String),
    /// `400 bad_key`: the actor key (or kind) is not a valid id.
    #[error("{0}")]
    BadKey(String),
    /// `400 bad_message`: the body is not JSON, or not a message of the kind.
    #[error("{0}")]
    BadMessage(String),
    /// `408 body_timeout`: the body did not arrive within `Options::body_timeout`; nothing
    /// was sent.
    #[error("the request's body did not arrive within {0:?}")]
    BodyTimeout(std::time::Duration),
    /// `415 not_json`: the request's `Content-Type` is not `application/json`.
    #[error("the body must be sent as Content-Type: application/json")]
    NotJson,
    /// `401 unauthorized`: the bearer token is missing or wrong.
    #[error("a bearer token is required (Authorization: Bearer <token>)")]
    Unauthorized,
    /// `403 writes_disabled`: a write to an admin API that only reads.
    #[error(
        "this admin API only reads (start it with writes allowed: `loom serve --allow-writes`, with LOOM_TOKEN set)"
    )]
    WritesDisabled,
    /// `403 forbidden_host`: a request to the admin API or the ingress under a `Host` it does
    /// not serve.
    #[error("this server does not serve host {0:?}")]
    ForbiddenHost(String),
    /// `404 not_found`: no such dead letter, parked actor, or kept state.
    #[error("{0}")]
    NotFound(String),
    /// `404 unknown_kind`: the kind is neither hosted by this runtime nor declared with
    /// `sends_to`.
    #[error("{0}")]
    UnknownKind(String),
    /// `409 cancelled`: the invocation was cancelled and ended so.
    #[error("{0}")]
    Cancelled(String),
    /// `413 too_large`: the body is over the limit (or the message, once encoded, over
    /// Loom's limit).
    #[error("{0}")]
    TooLarge(String),
    /// `422 rejected`: the handler refused the message; the actor's state is unchanged.
    #[error("rejected: {reason}")]
    Rejected {
        /// The handler's reason.
        reason: String,
        /// The value it gave with the reason, if any.
        value: Option<Value>,
    },
    /// `429 mailbox_full`: backpressure (`Config::max_mailbox`).
    #[error("{0}")]
    MailboxFull(String),
    /// `500 failed`: the message was given up on and dead-lettered.
    #[error("{0}")]
    Failed(String),
    /// `500 internal`: something Loom cannot fix by retrying: damaged data in the store, a
    /// journal that does not replay, a recorded reply that does not decode.
    #[error("{0}")]
    Internal(String),
    /// `503 unavailable`: the store failed or the runtime is shutting down. A request that
    /// failed this way may or may not have been sent: retry it with the same `Idempotency-Key`
    /// (an ask's response names the key it went under, its own or one the ingress made up).
    /// A send retried without a key may run twice.
    #[error("{message}")]
    Unavailable {
        /// What failed.
        message: String,
        /// What to do, when Loom knows.
        hint: Option<&'static str>,
    },
    /// `504 timeout`: no reply in time. The message may still run; asking again with the same
    /// `Idempotency-Key` returns its reply without running it twice. The response names that
    /// key (`"idempotency_key"` and the `Idempotency-Key` header), made up by the ingress when
    /// the ask gave none.
    #[error("{0}")]
    Timeout(String),
}

impl ApiError {
    /// The status and the stable code of the JSON body.
    pub fn status(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::BadKey(_) => (StatusCode::BAD_REQUEST, "bad_key"),
            ApiError::BadMessage(_) => (StatusCode::BAD_REQUEST, "bad_message"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::NotJson => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "not_json"),
            ApiError::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "body_timeout"),
            ApiError::WritesDisabled => (StatusCode::FORBIDDEN, "writes_disabled"),
            ApiError::ForbiddenHost(_) => (StatusCode::FORBIDDEN, "forbidden_host"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::UnknownKind(_) => (StatusCode::NOT_FOUND, "unknown_kind"),
            ApiError::Cancelled(_) => (StatusCode::CONFLICT, "cancelled"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ApiError::Rejected { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "rejected"),
            ApiError::MailboxFull(_) => (StatusCode::TOO_MANY_REQUESTS, "mailbox_full"),
            ApiError::Failed(_) => (StatusCode::INTERNAL_SERVER_ERROR, "failed"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            ApiError::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
        }
    }
}

/// The `Retry-After` of a `429 mailbox_full` and a `503 unavailable`, in seconds.
pub const RETRY_AFTER_SECS: &str = "1";

impl From<SendError> for ApiError {
    fn from(e: SendError) -> Self {
        let text = e.to_string();
        match e {
            SendError::InvalidId(_) => ApiError::BadKey(text),
            SendError::UnknownKind(_) => ApiError::UnknownKind(text),
            SendError::Encode(_) | SendError::BadMessage { .. } => ApiError::BadMessage(text),
            SendError::Invalid(_) => ApiError::BadRequest(text),
            SendError::MailboxFull { .. } => ApiError::MailboxFull(text),
            SendError::Store(s) => s.into(),
            SendError::Shutdown => ApiError::Unavailable {
                message: text,
                hint: None,
            },
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::TooLarge { .. } => ApiError::TooLarge(e.to_string()),
            StoreError::InvalidId(_) => ApiError::BadKey(e.to_string()),
            StoreError::InvalidRequest(_) => ApiError::BadRequest(e.to_string()),
            StoreError::DeadLetterNotFound(_) => ApiError::NotFound(e.to_string()),
            StoreError::Corrupt { .. } => ApiError::Internal(e.to_string()),
            e => ApiError::Unavailable {
                hint: e.hint(),
                message: e.to_string(),
            },
        }
    }
}

impl From<AskError> for ApiError {
    fn from(e: AskError) -> Self {
        let text = e.to_string();
        match e {
            AskError::Send(s) => s.into(),
            AskError::Rejected(r) => ApiError::Rejected {
                reason: r.reason().to_owned(),
                value: r.value().cloned(),
            },
            AskError::Failed(_) => ApiError::Failed(text),
            AskError::Cancelled(_) => ApiError::Cancelled(text),
            AskError::Timeout { .. } => ApiError::Timeout(text),
            AskError::BadReply(_) => ApiError::Internal(text),
            AskError::Stopped { .. } => ApiError::Unavailable {
                hint: None,
                message: text,
            },
            // As the store error alone maps (damaged data is not worth a retry), with the
            // ask's text, which names the key to ask again with.
            AskError::Store { error, .. } => match ApiError::from(error) {
                ApiError::Unavailable { hint, .. } => ApiError::Unavailable {
                    hint,
                    message: text,
                },
                ApiError::Internal(_) => ApiError::Internal(text),
                other => other,
            },
        }
    }
}

/// An ask's failure with the idempotency key its message went under (the caller's, or the one
/// the ingress made up): a `504 timeout` or a `503 unavailable` leaves a message that may run
/// (or have run), and asking again with this key returns its reply without running it twice.
/// The body gets `"idempotency_key"`, and the response an `Idempotency-Key` header.
#[derive(Debug)]
pub(crate) struct Keyed(pub(crate) ApiError, pub(crate) loom_core::IdempotencyKey);

impl IntoResponse for Keyed {
    fn into_response(self) -> Response {
        let Keyed(error, key) = self;
        let mut resp = error.into_response_with(|body| {
            body["idempotency_key"] = json!(key.as_str());
        });
        // The ingress's keys came in a header or were made up here, so they are header values
        // (one of a library caller's that is not would be in the body alone).
        if let Ok(v) = axum::http::HeaderValue::from_str(key.as_str()) {
            resp.headers_mut().insert("idempotency-key", v);
        }
        resp
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.into_response_with(|_| {})
    }
}

impl ApiError {
    /// The response, its JSON body first passed to `more`.
    fn into_response_with(self, more: impl FnOnce(&mut Value)) -> Response {
        let (status, code) = self.status();
        let mut body = json!({ "error": code, "message": self.to_string() });
        match &self {
            ApiError::Rejected { reason, value } => {
                body["reason"] = json!(reason);
                if let Some(v) = value {
                    body["value"] = v.clone();
                }
            }
            ApiError::Unavailable {
                hint: Some(hint), ..
            } => body["hint"] = json!(hint),
            _ => {}
        }
        more(&mut body);
        let mut resp = (status, axum::Json(body)).into_response();
        if matches!(self, ApiError::Unauthorized) {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        // A hint for clients and proxies to back off rather than retry at once: a backlog or a
        // failing store is not gone in a moment.
        if matches!(
            self,
            ApiError::MailboxFull(_) | ApiError::Unavailable { .. }
        ) {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store refusing Loom's login (a password rotated under a running node) is `503` with
    /// the store's hint, for the client to retry; before, `400 bad_request`, a request not to
    /// be retried.
    #[test]
    fn a_store_refusing_loom_is_unavailable_not_the_clients_fault() {
        let e = StoreError::Denied {
            backend: "postgres",
            message: "the login was refused".into(),
        };
        let api = ApiError::from(SendError::Store(e));
        assert!(
            matches!(&api, ApiError::Unavailable { hint: Some(h), .. } if h.contains("login")),
            "{api:?}"
        );
        assert_eq!(
            api.status(),
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        );
    }
}
