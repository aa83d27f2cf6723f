//! What JSON cannot hold: a NaN or an infinity. serde_json encodes one as `null` without an
//! error, so a value holding one would be journaled, sent or recorded as another value, which
//! then does not decode (an `f64`: an actor parked at its next recovery, a message
//! dead-lettered by its receiver) or decodes otherwise (an `Option<f64>` read back as `None`).
//! [`refuse_non_finite`] looks for one by serializing the value into nothing: no allocation,
//! and run only when the value's JSON has a `null` in it (a non-finite float encodes as one).

use serde::ser::{self, Serialize};
use serde_json::Value;

/// Refuses `value` (whose JSON is `json`) if it holds a NaN or an infinity, saying what it is
/// (`what`: "state", "message", ...).
pub(crate) fn refuse_non_finite<T: Serialize + ?Sized>(
    value: &T,
    json: &Value,
    what: &str,
) -> Result<(), String> {
    if !has_null(json) || !holds_non_finite(value) {
        return Ok(());
    }
    Err(format!(
        "the {what} holds a NaN or an infinity, which JSON cannot hold (serde_json would write null in its place)"
    ))
}

fn has_null(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.iter().any(has_null),
        Value::Object(o) => o.values().any(has_null),
        _ => false,
    }
}

/// Whether serializing `value` meets a float that is not finite. A value whose own
/// serialization fails is not this check's business (its encoding reports that).
fn holds_non_finite<T: Serialize + ?Sized>(value: &T) -> bool {
    // A hand-written `Serialize` may panic: it did not when the value was encoded just before,
    // and one that does now is left to that encoding's outcome.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        matches!(value.serialize(Finite), Err(Found::NonFinite))
    }))
    .unwrap_or(false)
}

/// Why [`Finite`] stopped.
#[derive(Debug)]
enum Found {
    NonFinite,
    /// The value's own `Serialize` failed.
    Other,
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Found::NonFinite => "a non-finite float",
            Found::Other => "a serialization error",
        })
    }
}

impl std::error::Error for Found {}

impl ser::Error for Found {
    fn custom<M: std::fmt::Display>(_: M) -> Self {
        Found::Other
    }
}

/// A serializer that writes nothing and stops at the first non-finite float.
struct Finite;

fn float(v: f64) -> Result<(), Found> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(Found::NonFinite)
    }
}

macro_rules! nothing {
    ($($name:ident: $t:ty),* $(,)?) => {
        $(fn $name(self, _: $t) -> Result<(), Found> { Ok(()) })*
    };
}

impl ser::Serializer for Finite {
    type Ok = ();
    type Error = Found;
    type SerializeSeq = Finite;
    type SerializeTuple = Finite;
    type SerializeTupleStruct = Finite;
    type SerializeTupleVariant = Finite;
    type SerializeMap = Finite;
    type SerializeStruct = Finite;
    type SerializeStructVariant = Finite;

    nothing!(
        serialize_bool: bool, serialize_i8: i8, serialize_i16: i16, serialize_i32: i32,
        serialize_i64: i64, serialize_i128: i128, serialize_u8: u8, serialize_u16: u16,
        serialize_u32: u32, serialize_u64: u64, serialize_u128: u128, serialize_char: char,
        serialize_str: &str, serialize_bytes: &[u8], serialize_unit_struct: &'static str,
    );

    fn serialize_f32(self, v: f32) -> Result<(), Found> {
        float(f64::from(v))
    }
    fn serialize_f64(self, v: f64) -> Result<(), Found> {
        float(v)
    }
    fn serialize_none(self) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Result<(), Found> {
        v.serialize(Finite)
    }
    fn serialize_unit(self) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> Result<(), Found> {
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        v: &T,
    ) -> Result<(), Found> {
        v.serialize(Finite)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        v: &T,
    ) -> Result<(), Found> {
        v.serialize(Finite)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Finite, Found> {
        Ok(Finite)
    }
    fn serialize_tuple(self, _: usize) -> Result<Finite, Found> {
        Ok(Finite)
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Finite, Found> {
        Ok(Finite)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Finite, Found> {
        Ok(Finite)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Finite, Found> {
        Ok(Finite)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Finite, Found> {
        Ok(Finite)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Finite, Found> {
        Ok(Finite)
    }
}

macro_rules! elements {
    ($($tr:ident :: $f:ident),* $(,)?) => {
        $(impl ser::$tr for Finite {
            type Ok = ();
            type Error = Found;
            fn $f<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Found> {
                v.serialize(Finite)
            }
            fn end(self) -> Result<(), Found> {
                Ok(())
            }
        })*
    };
}

elements!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field,
);

impl ser::SerializeMap for Finite {
    type Ok = ();
    type Error = Found;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> Result<(), Found> {
        k.serialize(Finite)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Found> {
        v.serialize(Finite)
    }
    fn end(self) -> Result<(), Found> {
        Ok(())
    }
}

macro_rules! fields {
    ($($tr:ident),* $(,)?) => {
        $(impl ser::$tr for Finite {
            type Ok = ();
            type Error = Found;
            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                _: &'static str,
                v: &T,
            ) -> Result<(), Found> {
                v.serialize(Finite)
            }
            fn end(self) -> Result<(), Found> {
                Ok(())
            }
        })*
    };
}

fields!(SerializeStruct, SerializeStructVariant);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;

    #[derive(serde::Serialize)]
    struct S {
        a: f64,
        b: Option<f32>,
        c: Vec<(u8, f64)>,
        d: BTreeMap<String, Option<f64>>,
        e: E,
    }

    #[derive(serde::Serialize)]
    enum E {
        Unit,
        New(f64),
        Struct { x: f64 },
    }

    fn s(a: f64, b: Option<f32>, c: f64, d: Option<f64>, e: E) -> S {
        S {
            a,
            b,
            c: vec![(1, c)],
            d: BTreeMap::from([("k".to_owned(), d)]),
            e,
        }
    }

    fn refused(v: &S) -> bool {
        let json = serde_json::to_value(v).unwrap();
        refuse_non_finite(v, &json, "state").is_err()
    }

    /// A non-finite float anywhere is found; finite ones, `None`s and units are not, and a
    /// value with no `null` in its JSON is not looked at.
    #[test]
    fn a_nan_or_an_infinity_anywhere_is_found_and_nothing_else() {
        assert!(!refused(&s(1.0, None, 2.0, None, E::Unit)));
        assert!(!refused(&s(1.0, Some(1.5), 2.0, Some(3.0), E::New(1.0))));
        assert!(refused(&s(f64::NAN, None, 2.0, None, E::Unit)));
        assert!(refused(&s(1.0, Some(f32::INFINITY), 2.0, None, E::Unit)));
        assert!(refused(&s(1.0, None, f64::NEG_INFINITY, None, E::Unit)));
        assert!(refused(&s(1.0, None, 2.0, Some(f64::NAN), E::Unit)));
        assert!(refused(&s(1.0, None, 2.0, None, E::New(f64::NAN))));
        assert!(refused(&s(
            1.0,
            None,
            2.0,
            None,
            E::Struct { x: f64::INFINITY }
        )));
        // The JSON says whether to look: no null, no look.
        let v = s(f64::NAN, None, 2.0, None, E::Unit);
        assert!(refuse_non_finite(&v, &json!({ "a": 1 }), "state").is_ok());
        let e = refuse_non_finite(&v, &json!(null), "message").unwrap_err();
        assert!(e.contains("the message holds a NaN or an infinity"), "{e}");
    }
}
