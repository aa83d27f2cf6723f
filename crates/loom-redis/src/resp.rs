//! Reading Redis replies: the small decoders every file of this backend shares.

use std::time::Duration;

use loom_core::{StoreError, StoreResult};
use redis::Value;

use crate::{BACKEND, Unexpected};

pub(crate) fn unexpected(what: impl Into<String>) -> StoreError {
    StoreError::storage(BACKEND, Unexpected(what.into()))
}

pub(crate) fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Okay => Some("OK".to_owned()),
        _ => None,
    }
}

pub(crate) fn bytes(v: Option<&Value>) -> Option<Vec<u8>> {
    match v? {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        _ => None,
    }
}

pub(crate) fn number(v: Option<&Value>, what: &str) -> StoreResult<u64> {
    text(v)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| unexpected(format!("{what} is not a number")))
}

/// A sorted set's score (a due time in ms): Redis keeps scores as doubles and writes one past
/// 10^17 in exponent form ("1.8446744073709552e+19" for a due time of `Timestamp::MAX`, which a
/// delay too long to add saturates to), so a float is read too, saturating at `u64::MAX`.
pub(crate) fn score(v: Option<&Value>, what: &str) -> StoreResult<u64> {
    let t = text(v).ok_or_else(|| unexpected(format!("{what} is not a number")))?;
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n);
    }
    match t.parse::<f64>() {
        // `as` saturates: a score past u64::MAX (a double's rounding of it) reads as u64::MAX.
        Ok(f) if f >= 0.0 => Ok(f as u64),
        _ => Err(unexpected(format!("{what} is not a number: {t:?}"))),
    }
}

pub(crate) fn status(r: &[Value]) -> String {
    text(r.first()).unwrap_or_default()
}

pub(crate) fn ttl(d: Duration) -> Vec<u8> {
    d.as_millis().max(1).to_string().into_bytes()
}

pub(crate) fn s(v: impl ToString) -> Vec<u8> {
    v.to_string().into_bytes()
}

/// A stream entry's id and its fields.
pub(crate) type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// Fields of a stream entry (`[id, [field, value, ...]]`).
pub(crate) fn entry_fields(v: &Value) -> Option<StreamEntry> {
    let Value::Array(parts) = v else { return None };
    let id = text(parts.first())?;
    let Value::Array(kv) = parts.get(1)? else {
        return None;
    };
    let mut out = Vec::new();
    for pair in kv.chunks(2) {
        out.push((text(pair.first())?, bytes(pair.get(1))?));
    }
    Some((id, out))
}

pub(crate) fn field<'a>(fields: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_slice())
}
