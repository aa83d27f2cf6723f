//! The [`Actor`] trait: what user code implements.

use std::future::Future;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::context::Context;

/// A kind of durable actor.
///
/// The runtime keeps one `State` per actor id (`KIND/key`), starting from `State::default()`.
/// [`handle`](Self::handle) gets the state, a [`Context`] for durable calls, and one message; it
/// returns a reply or a [`Rejected`]:
/// - on `Ok`, the state change is journaled (as a JSON Patch), together with the reply, in one
///   atomic write that also consumes the message;
/// - on `Err(Rejected)`, the state goes back to what it was before the message, and the
///   rejection is journaled and returned to the caller.
///
/// Keep the handler deterministic: anything that may differ between runs (clocks, randomness,
/// I/O) goes through [`Context::activity`], whose result is journaled and replayed after a crash.
///
/// ```
/// use loom_core::runtime::{Actor, Context, Rejected};
/// use serde::{Deserialize, Serialize};
///
/// struct Account;
///
/// #[derive(Default, Serialize, Deserialize)]
/// struct Balance {
///     cents: i64,
/// }
///
/// #[derive(Serialize, Deserialize)]
/// enum AccountMsg {
///     Deposit(i64),
///     Withdraw(i64),
///     Balance,
/// }
///
/// impl Actor for Account {
///     const KIND: &'static str = "account";
///     type State = Balance;
///     type Message = AccountMsg;
///     type Reply = i64;
///
///     async fn handle(&self, state: &mut Balance, _ctx: &mut Context<'_>, msg: AccountMsg) -> Result<i64, Rejected> {
///         match msg {
///             AccountMsg::Deposit(n) => state.cents += n,
///             AccountMsg::Withdraw(n) if n > state.cents => return Err(Rejected::new("insufficient funds")),
///             AccountMsg::Withdraw(n) => state.cents -= n,
///             AccountMsg::Balance => {}
///         }
///         Ok(state.cents)
///     }
/// }
/// ```
pub trait Actor: Send + Sync + 'static {
    /// The kind's name, the first half of every id of this kind (`account` in `account/alice`).
    const KIND: &'static str;
    /// The actor's state.
    type State: Serialize + DeserializeOwned + Default + Send + Sync + 'static;
    /// What it receives.
    type Message: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// What it answers.
    type Reply: Serialize + DeserializeOwned + Send + 'static;

    /// The version of `State`'s schema (default 1). Raise it when `State` changes shape, and
    /// say in [`upgrade_state`](Self::upgrade_state) how an older state becomes this one.
    const STATE_VERSION: u32 = 1;

    /// Turns state written under an older version of the schema (`from`, below
    /// [`STATE_VERSION`](Self::STATE_VERSION)) into this version's, as JSON.
    ///
    /// Called when an actor whose journal or snapshot holds older state is loaded; the
    /// upgraded state is journaled (a `state_upgraded` entry) before the actor handles
    /// anything, so the upgrade runs once per actor and later patches apply to the new shape.
    /// An error (or a panic, or a result that does not decode as `State`) parks the actor with
    /// the reason, and journals nothing: fix the code and unpark it. A node whose code is
    /// *older* than the state's version leaves the actor to a node with newer code (it is not
    /// parked; its messages wait meanwhile). `STATE_VERSION` starts at 1.
    ///
    /// The default refuses every upgrade.
    ///
    /// ```
    /// use loom_core::runtime::{Actor, Context, Rejected};
    /// use serde::{Deserialize, Serialize};
    /// use serde_json::{Value, json};
    ///
    /// struct Account;
    ///
    /// // Version 1 was `{ "cents": i64 }`; version 2 keeps a currency too.
    /// #[derive(Default, Serialize, Deserialize)]
    /// struct Balance {
    ///     cents: i64,
    ///     currency: String,
    /// }
    ///
    /// impl Actor for Account {
    ///     const KIND: &'static str = "account";
    ///     const STATE_VERSION: u32 = 2;
    ///     type State = Balance;
    ///     type Message = i64;
    ///     type Reply = i64;
    ///
    ///     fn upgrade_state(&self, from: u32, mut state: Value) -> Result<Value, String> {
    ///         match from {
    ///             1 => {
    ///                 state["currency"] = json!("EUR");
    ///                 Ok(state)
    ///             }
    ///             v => Err(format!("no upgrade from version {v}")),
    ///         }
    ///     }
    ///
    ///     async fn handle(&self, b: &mut Balance, _ctx: &mut Context<'_>, n: i64) -> Result<i64, Rejected> {
    ///         b.cents += n;
    ///         Ok(b.cents)
    ///     }
    /// }
    ///
    /// let v1 = json!({ "cents": 500 });
    /// assert_eq!(Account.upgrade_state(1, v1).unwrap(), json!({ "cents": 500, "currency": "EUR" }));
    /// ```
    fn upgrade_state(&self, from: u32, _state: Value) -> Result<Value, String> {
        Err(format!(
            "{} state is at version {from}, the code's is {}, and the code has no upgrade \
             (implement Actor::upgrade_state)",
            Self::KIND,
            Self::STATE_VERSION
        ))
    }

    /// Handles one message.
    fn handle(
        &self,
        state: &mut Self::State,
        ctx: &mut Context<'_>,
        msg: Self::Message,
    ) -> impl Future<Output = Result<Self::Reply, Rejected>> + Send;
}

/// A handler's refusal of a message: the state is left as it was, and the caller gets the
/// reason, and a typed value if the handler gave one.
///
/// ```
/// use loom_core::runtime::Rejected;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// struct Shortfall {
///     missing_cents: i64,
/// }
///
/// let r = Rejected::with_value("insufficient funds", &Shortfall { missing_cents: 250 });
/// assert_eq!(r.reason(), "insufficient funds");
/// // What the caller does with `AskError::Rejected(r)`:
/// let s: Shortfall = r.value_as().unwrap().unwrap();
/// assert_eq!(s.missing_cents, 250);
/// assert!(Rejected::new("no").value().is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{reason}")]
pub struct Rejected {
    reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<Value>,
    /// Set when the rejection is a cancellation passed on
    /// ([`StepError::Cancelled`](super::StepError::Cancelled) with `?`): the caller gets
    /// `AskError::Cancelled`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    cancelled: bool,
}

impl Rejected {
    /// A rejection with a reason.
    pub fn new(reason: impl Into<String>) -> Self {
        Rejected {
            reason: reason.into(),
            value: None,
            cancelled: false,
        }
    }

    /// The rejection of an invocation that ends because it was asked to be cancelled: what
    /// [`StepError::Cancelled`](super::StepError::Cancelled) becomes when the handler passes
    /// it on with `?`. Its caller gets `AskError::Cancelled` with `reason`.
    ///
    /// ```
    /// use loom_core::runtime::Rejected;
    ///
    /// assert!(Rejected::cancelled("the order was withdrawn").is_cancelled());
    /// assert!(!Rejected::new("no").is_cancelled());
    /// ```
    pub fn cancelled(reason: impl Into<String>) -> Self {
        Rejected {
            cancelled: true,
            ..Rejected::new(reason)
        }
    }

    /// True for a cancellation ([`cancelled`](Self::cancelled)).
    pub fn is_cancelled(&self) -> bool {
        self.cancelled
    }

    /// A rejection with a reason and a typed value for the caller (read back with
    /// [`value_as`](Self::value_as)). A value that does not encode as JSON, or is larger than
    /// [`MAX_ERROR_VALUE_BYTES`](crate::limits::MAX_ERROR_VALUE_BYTES), is left out, and the
    /// reason says why.
    pub fn with_value<T: Serialize + ?Sized>(reason: impl Into<String>, value: &T) -> Self {
        let reason = reason.into();
        match crate::limits::error_value(value) {
            Ok(v) => Rejected {
                reason,
                value: Some(v),
                cancelled: false,
            },
            Err(why) => Rejected::new(format!("{reason} ({why})")),
        }
    }

    /// The same rejection with `value` (JSON, already within the limit) as its value.
    pub(crate) fn set_value(mut self, value: Option<Value>) -> Self {
        self.value = value;
        self
    }

    /// The reason.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The value, as JSON, if the handler gave one.
    pub fn value(&self) -> Option<&Value> {
        self.value.as_ref()
    }

    /// The value decoded as `T`: `Ok(None)` if there is none, an error if it is not a `T`.
    pub fn value_as<T: DeserializeOwned>(&self) -> Result<Option<T>, serde_json::Error> {
        self.value.clone().map(serde_json::from_value).transpose()
    }
}
