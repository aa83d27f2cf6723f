//! The journal format: how entries, snapshots and the other stored records become bytes.
//!
//! Every record a backend stores is one **frame**:
//!
//! ```text
//! offset  size  field
//! 0       1     format version (FORMAT_VERSION = 1)
//! 1       1     record type: b'E' entry, b'S' snapshot, b'M' mailbox message, b'D' dead letter,
//!               b'I' idempotency record, b'L' lease, b'P' park record
//! 2       4     CRC-32 (IEEE) of the body, little-endian
//! 6       n     body: the record as UTF-8 JSON (serde, field names as in the Rust types)
//! ```
//!
//! Invariants kept here, for every backend alike:
//! - a frame whose version this build does not know is refused ([`CodecError::UnknownVersion`]),
//!   never guessed at;
//! - a frame whose checksum does not match its body is refused ([`CodecError::Checksum`]): rot
//!   in a file or a store is detected on read, and wrong data is never served;
//! - an entry read back under a seq other than its own is refused ([`CodecError::SeqMismatch`]),
//!   so a record copied to the wrong place cannot pass for another.
//!
//! The JSON body keeps a journal readable with `loom journal show` and portable between stores.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::entry::{Entry, Seq, Snapshot};

/// The frame format this build writes, and the only one it reads.
pub const FORMAT_VERSION: u8 = 1;

/// Bytes before the body.
pub const HEADER_LEN: usize = 6;

/// What a frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordType {
    /// A journal [`Entry`].
    Entry = b'E',
    /// A [`Snapshot`].
    Snapshot = b'S',
    /// A message waiting in a mailbox.
    Message = b'M',
    /// A dead letter.
    DeadLetter = b'D',
    /// An idempotency record.
    Idempotency = b'I',
    /// A lease.
    Lease = b'L',
    /// A parked actor's record.
    Park = b'P',
}

impl RecordType {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            b'E' => RecordType::Entry,
            b'S' => RecordType::Snapshot,
            b'M' => RecordType::Message,
            b'D' => RecordType::DeadLetter,
            b'I' => RecordType::Idempotency,
            b'L' => RecordType::Lease,
            b'P' => RecordType::Park,
            _ => return None,
        })
    }
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// Fewer bytes than a header.
    #[error("record is {len} bytes long, shorter than the {HEADER_LEN}-byte header")]
    Truncated {
        /// Bytes present.
        len: usize,
    },
    /// A format version this build does not read.
    #[error("record has format version {found}; this build reads version {FORMAT_VERSION}")]
    UnknownVersion {
        /// The version found.
        found: u8,
    },
    /// A record of another type than the one asked for.
    #[error("record has type byte {found:#04x}; expected {expected:?}")]
    WrongType {
        /// What the caller expected.
        expected: RecordType,
        /// The byte found.
        found: u8,
    },
    /// The body does not match its checksum.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// The checksum in the header.
        stored: u32,
        /// The checksum of the body as read.
        computed: u32,
    },
    /// The body is not the JSON of the expected record.
    #[error("record body does not decode: {0}")]
    Body(String),
    /// An entry stored under one seq claims another.
    #[error("entry stored at seq {stored_at} says it is seq {claims}")]
    SeqMismatch {
        /// The seq it was read under.
        stored_at: Seq,
        /// The seq in its body.
        claims: Seq,
    },
    /// A record could not be encoded (a value serde cannot write, such as a map with non-string
    /// keys).
    #[error("record does not encode: {0}")]
    Encode(String),
}

/// Encodes any record as one frame.
pub fn encode<T: Serialize>(ty: RecordType, value: &T) -> Result<Vec<u8>, CodecError> {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(&[FORMAT_VERSION, ty as u8, 0, 0, 0, 0]);
    serde_json::to_writer(&mut buf, value).map_err(|e| CodecError::Encode(e.to_string()))?;
    let crc = crc32fast::hash(&buf[HEADER_LEN..]);
    buf[2..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    Ok(buf)
}

/// Checks a frame's header and checksum and returns its body.
pub fn open_frame(ty: RecordType, bytes: &[u8]) -> Result<&[u8], CodecError> {
    if bytes.len() < HEADER_LEN {
        return Err(CodecError::Truncated { len: bytes.len() });
    }
    if bytes[0] != FORMAT_VERSION {
        return Err(CodecError::UnknownVersion { found: bytes[0] });
    }
    if RecordType::from_byte(bytes[1]) != Some(ty) {
        return Err(CodecError::WrongType {
            expected: ty,
            found: bytes[1],
        });
    }
    let stored = u32::from_le_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]);
    let body = &bytes[HEADER_LEN..];
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(CodecError::Checksum { stored, computed });
    }
    Ok(body)
}

/// Decodes a frame of the given type.
pub fn decode<T: DeserializeOwned>(ty: RecordType, bytes: &[u8]) -> Result<T, CodecError> {
    let body = open_frame(ty, bytes)?;
    serde_json::from_slice(body).map_err(|e| CodecError::Body(e.to_string()))
}

/// Encodes a journal entry.
pub fn encode_entry(entry: &Entry) -> Result<Vec<u8>, CodecError> {
    encode(RecordType::Entry, entry)
}

/// Decodes a journal entry read from position `seq`, checking that it is that entry.
pub fn decode_entry(seq: Seq, bytes: &[u8]) -> Result<Entry, CodecError> {
    let entry: Entry = decode(RecordType::Entry, bytes)?;
    if entry.seq != seq {
        return Err(CodecError::SeqMismatch {
            stored_at: seq,
            claims: entry.seq,
        });
    }
    Ok(entry)
}

/// Encodes a snapshot.
pub fn encode_snapshot(snapshot: &Snapshot) -> Result<Vec<u8>, CodecError> {
    encode(RecordType::Snapshot, snapshot)
}

/// Decodes a snapshot stored at `seq`, checking that it is that snapshot.
pub fn decode_snapshot(seq: Seq, bytes: &[u8]) -> Result<Snapshot, CodecError> {
    let snap: Snapshot = decode(RecordType::Snapshot, bytes)?;
    if snap.seq != seq {
        return Err(CodecError::SeqMismatch {
            stored_at: seq,
            claims: snap.seq,
        });
    }
    Ok(snap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::EntryKind;

    fn entry() -> Entry {
        Entry::new(
            7,
            EntryKind::Completed {
                reply: serde_json::json!({"ok": [1, 2, 3]}),
            },
        )
    }

    #[test]
    fn round_trip() {
        let e = entry();
        let bytes = encode_entry(&e).unwrap();
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(bytes[1], b'E');
        assert_eq!(decode_entry(7, &bytes).unwrap(), e);
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let bytes = encode_entry(&entry()).unwrap();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(
                    decode_entry(7, &b).is_err(),
                    "flip at byte {i} bit {bit} passed"
                );
            }
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let bytes = encode_entry(&entry()).unwrap();
        for len in 0..bytes.len() {
            assert!(
                decode_entry(7, &bytes[..len]).is_err(),
                "cut at {len} passed"
            );
        }
    }

    #[test]
    fn misplaced_and_mistyped_records_are_refused() {
        let bytes = encode_entry(&entry()).unwrap();
        assert_eq!(
            decode_entry(8, &bytes),
            Err(CodecError::SeqMismatch {
                stored_at: 8,
                claims: 7
            })
        );
        assert!(matches!(
            decode_snapshot(7, &bytes),
            Err(CodecError::WrongType { .. })
        ));
        let mut future = bytes.clone();
        future[0] = 2;
        assert_eq!(
            decode_entry(7, &future),
            Err(CodecError::UnknownVersion { found: 2 })
        );
    }
}
