//! Bad input to every decoder and parser: never a panic, always a typed error.
//!
//! Default case counts keep CI quick; for the long run:
//! `PROPTEST_CASES=1000000 cargo test --release -p loom-core --test decode_props`.

use loom_core::codec::{self, RecordType};
use loom_core::{ActorId, Entry, EntryKind, Envelope, IdempotencyKey, MessageId, Snapshot};
use proptest::prelude::*;
use serde_json::json;

fn valid_entry() -> Vec<u8> {
    codec::encode_entry(&Entry::new(
        7,
        EntryKind::Invoked {
            message_id: MessageId::new(),
            payload: json!({"Deposit": 10, "note": "ünïcode"}),
            idempotency_key: Some(IdempotencyKey::new("k").unwrap()),
            requeued_from: None,
        },
    ))
    .unwrap()
}

fn valid_snapshot() -> Vec<u8> {
    codec::encode_snapshot(&Snapshot::new(
        9,
        json!({"state": {"balance": 1}, "recent": []}),
    ))
    .unwrap()
}

fn valid_message() -> Vec<u8> {
    let to = ActorId::new("acct", "alice").unwrap();
    codec::encode(RecordType::Message, &Envelope::new(to, json!([1, 2, 3]))).unwrap()
}

/// A frame with a correct header and checksum around any body: only the body's shape is wrong.
fn framed(ty: RecordType, body: &[u8]) -> Vec<u8> {
    let mut f = vec![codec::FORMAT_VERSION, ty as u8, 0, 0, 0, 0];
    f.extend_from_slice(body);
    let crc = crc32fast::hash(body);
    f[2..6].copy_from_slice(&crc.to_le_bytes());
    f
}

/// Decodes with every decoder; none may panic.
fn decode_all(bytes: &[u8]) {
    let _ = codec::decode_entry(7, bytes);
    let _ = codec::decode_snapshot(9, bytes);
    let _ = codec::decode::<Envelope>(RecordType::Message, bytes);
    let _ = codec::decode::<loom_core::DeadLetter>(RecordType::DeadLetter, bytes);
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let n = bytes.len().max(1);
    match *m {
        Mutation::Flip(i, b) => {
            if !bytes.is_empty() {
                bytes[i % n] ^= 1 << b;
            }
        }
        Mutation::Insert(i, b) => bytes.insert(i % (bytes.len() + 1), b),
        Mutation::Remove(i) => {
            if !bytes.is_empty() {
                bytes.remove(i % n);
            }
        }
        Mutation::Truncate(i) => bytes.truncate(i % n),
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
    }

    #[test]
    fn mutated_frames_are_refused_never_misread(which in 0usize..3, ms in proptest::collection::vec(mutation(), 1..4)) {
        let original = [valid_entry(), valid_snapshot(), valid_message()][which].clone();
        let mut bytes = original.clone();
        for m in &ms {
            apply(&mut bytes, m);
        }
        decode_all(&bytes);
        if bytes != original {
            // CRC-32 catches every change of up to three bits and every burst shorter than 32 bits;
            // a changed frame that still decodes must at least decode to something else.
            let r = match which {
                0 => codec::decode_entry(7, &bytes).map(|e| codec::encode_entry(&e).unwrap()),
                1 => codec::decode_snapshot(9, &bytes).map(|s| codec::encode_snapshot(&s).unwrap()),
                _ => codec::decode::<Envelope>(RecordType::Message, &bytes).map(|e| codec::encode(RecordType::Message, &e).unwrap()),
            };
            if let Ok(re) = r {
                prop_assert_ne!(re, original, "a damaged frame decoded to the original record");
            }
        }
    }

    #[test]
    fn well_framed_garbage_bodies_are_typed_errors(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        for ty in [RecordType::Entry, RecordType::Snapshot, RecordType::Message, RecordType::DeadLetter] {
            decode_all(&framed(ty, &body));
        }
    }

    #[test]
    fn arbitrary_json_bodies_are_typed_errors(v in arbitrary_json()) {
        let body = serde_json::to_vec(&v).unwrap();
        for ty in [RecordType::Entry, RecordType::Snapshot, RecordType::Message] {
            decode_all(&framed(ty, &body));
        }
    }

    #[test]
    fn ids_and_keys_from_any_text_never_panic(s in ".{0,400}") {
        let _ = s.parse::<ActorId>();
        let _ = ActorId::new(&s, &s);
        let _ = IdempotencyKey::new(s.clone());
        let _ = s.parse::<MessageId>();
        if let Ok(id) = s.parse::<ActorId>() {
            prop_assert_eq!(id.to_string(), s);
        }
    }
}

fn arbitrary_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        ".{0,20}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}
