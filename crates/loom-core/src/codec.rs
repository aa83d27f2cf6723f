//! The journal format: how entries, snapshots and the other stored records become bytes.
//!
//! Every record a backend stores is one **frame**:
//!
//! ```text
//! offset  size  field
//! 0       1     format version: 1 (FORMAT_VERSION) the body is JSON; 2 (FORMAT_ZSTD) the
//!               body is that JSON compressed with zstd (one frame, its content size set)
//! 1       1     record type: b'E' entry, b'S' snapshot, b'M' mailbox message, b'D' dead letter,
//!               b'I' idempotency record, b'L' lease, b'P' park record
//! 2       4     CRC-32 (IEEE) of the body as stored (compressed or not), little-endian
//! 6       n     body: the record as UTF-8 JSON (serde, field names as in the Rust types)
//! ```
//!
//! Entries and snapshots whose JSON is longer than [`COMPRESS_ABOVE`] are stored compressed
//! when that makes them smaller; every other record, and every smaller one, is stored as JSON.
//! Frames of either version are read by every build since compression came; a build from
//! before refuses a compressed frame as an unknown version, never misreads it. Size limits
//! ([`crate::limits`]) apply to the uncompressed frame, so whether a record fits does not depend
//! on how well it compresses, and a journal fits every store alike.
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

/// The frame format whose body is plain JSON.
pub const FORMAT_VERSION: u8 = 1;

/// The frame format whose body is zstd-compressed JSON.
pub const FORMAT_ZSTD: u8 = 2;

/// Entries and snapshots with more JSON than this (bytes) are stored compressed if that is
/// smaller (4 KiB: below it, zstd saves little and costs a few microseconds per record).
pub const COMPRESS_ABOVE: usize = 4 * 1024;

/// 0: not decided yet (read `LOOM_COMPRESSION` on first use); 1: on; 2: off.
static COMPRESS: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Turns compression of new entries and snapshots on (the default) or off for this process;
/// the environment variable `LOOM_COMPRESSION=off` does the same for any program using Loom,
/// the `loom` tool included. Frames of both formats are read either way. Off is for a rolling
/// upgrade from a build that predates compression (it refuses compressed frames, and parks
/// the actor): run the new build with compression off until no old node is left, then on.
///
/// ```
/// use loom_core::codec;
///
/// codec::set_compression(false);
/// assert!(!codec::compression());
/// codec::set_compression(true);
/// ```
pub fn set_compression(on: bool) {
    COMPRESS.store(if on { 1 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
}

/// True if new large entries and snapshots are stored compressed ([`set_compression`]).
pub fn compression() -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    match COMPRESS.load(Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let off = std::env::var("LOOM_COMPRESSION")
                .is_ok_and(|v| matches!(v.trim(), "off" | "0" | "false" | "no"));
            // Whoever decides first wins; a racing `set_compression` is kept.
            match COMPRESS.compare_exchange(0, if off { 2 } else { 1 }, Relaxed, Relaxed) {
                Ok(_) => !off,
                Err(now) => now == 1,
            }
        }
    }
}

/// The zstd level (3: zstd's default, fast to write and much faster to read).
const ZSTD_LEVEL: i32 = 3;

/// Most bytes a compressed body may expand to: the largest record any limit allows, so a
/// corrupt or hostile size field cannot make a reader allocate more.
const MAX_EXPANDED: usize = crate::limits::MAX_SNAPSHOT_BYTES;

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
    /// A node's membership record.
    Member = b'N',
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
            b'N' => RecordType::Member,
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
    #[error(
        "record has format version {found}; this build reads versions {FORMAT_VERSION} and {FORMAT_ZSTD}"
    )]
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
    /// A compressed body does not decompress (or would expand past the largest record).
    #[error("compressed record body does not decompress: {0}")]
    Decompress(String),
}

/// A frame, and the size it has uncompressed (what size limits apply to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The frame as stored.
    pub frame: Vec<u8>,
    /// The frame's length with its body as plain JSON.
    pub plain_len: usize,
}

impl Encoded {
    /// True if the body is stored compressed.
    pub fn is_compressed(&self) -> bool {
        self.frame.first() == Some(&FORMAT_ZSTD)
    }
}

/// Encodes a record as one frame, compressing its body if `compress`, [`compression`] is on,
/// the JSON is longer than [`COMPRESS_ABOVE`], and compression makes it smaller.
pub fn encode_sized<T: Serialize>(
    ty: RecordType,
    value: &T,
    compress: bool,
) -> Result<Encoded, CodecError> {
    let frame = encode(ty, value)?;
    match compress {
        true => compress_frame(frame),
        false => Ok(Encoded {
            plain_len: frame.len(),
            frame,
        }),
    }
}

/// Compresses a plain entry or snapshot frame (from [`encode`]) if [`compression`] is on, its
/// JSON is longer than [`COMPRESS_ABOVE`], and compressing makes it smaller; otherwise keeps
/// it as it is. (Separate from encoding so that a caller can check limits on the plain size
/// before spending time compressing.)
pub fn compress_frame(frame: Vec<u8>) -> Result<Encoded, CodecError> {
    let plain_len = frame.len();
    let ty = frame.get(1).copied().and_then(RecordType::from_byte);
    let compressible = matches!(ty, Some(RecordType::Entry | RecordType::Snapshot));
    if !compressible
        || frame.first() != Some(&FORMAT_VERSION)
        || !compression()
        || plain_len <= HEADER_LEN + COMPRESS_ABOVE
    {
        return Ok(Encoded { frame, plain_len });
    }
    let ty = frame[1];
    let packed = zstd::bulk::compress(&frame[HEADER_LEN..], ZSTD_LEVEL)
        .map_err(|e| CodecError::Encode(format!("zstd: {e}")))?;
    if packed.len() + HEADER_LEN >= plain_len {
        return Ok(Encoded { frame, plain_len });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + packed.len());
    out.extend_from_slice(&[FORMAT_ZSTD, ty]);
    out.extend_from_slice(&crc32fast::hash(&packed).to_le_bytes());
    out.extend_from_slice(&packed);
    Ok(Encoded {
        frame: out,
        plain_len,
    })
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

/// How deep arrays and objects nest in JSON text (a byte scan: strings skipped, escapes
/// included). serde_json reads back no deeper than
/// [`READ_JSON_DEPTH`](crate::limits::READ_JSON_DEPTH).
pub fn json_depth(json: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Refused ([`StoreError::TooLarge`](crate::StoreError::TooLarge)) if the JSON text `json`
/// nests deeper than `limit` levels ([`MAX_JSON_DEPTH`](crate::limits::MAX_JSON_DEPTH), or one
/// less for a message, whose payload the entry that invokes it nests one level deeper).
pub(crate) fn check_depth(
    json: &[u8],
    limit: usize,
    what: impl FnOnce() -> String,
) -> crate::StoreResult<()> {
    // Each level takes two bytes at least.
    if json.len() < 2 * (limit + 1) {
        return Ok(());
    }
    let depth = json_depth(json);
    if depth > limit {
        return Err(crate::StoreError::TooLarge {
            what: format!("the nesting, in levels, of {}", what()),
            size: depth,
            limit,
            limit_kind: crate::Limit::JsonDepth,
        });
    }
    Ok(())
}

/// How deep arrays and objects nest in `v` (0 for a scalar).
pub fn value_depth(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Array(a) => 1 + a.iter().map(value_depth).max().unwrap_or(0),
        serde_json::Value::Object(o) => 1 + o.values().map(value_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Checks a frame's header and checksum and returns its body as stored (compressed if the
/// frame's version is [`FORMAT_ZSTD`]; [`decode`] expands it).
pub fn open_frame(ty: RecordType, bytes: &[u8]) -> Result<&[u8], CodecError> {
    if bytes.len() < HEADER_LEN {
        return Err(CodecError::Truncated { len: bytes.len() });
    }
    if bytes[0] != FORMAT_VERSION && bytes[0] != FORMAT_ZSTD {
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

/// Decodes a frame of the given type, compressed or not.
pub fn decode<T: DeserializeOwned>(ty: RecordType, bytes: &[u8]) -> Result<T, CodecError> {
    let body = open_frame(ty, bytes)?;
    if bytes[0] == FORMAT_ZSTD {
        // Only entries and snapshots are ever compressed, each within its own limit.
        let limit = match ty {
            RecordType::Entry => crate::limits::MAX_ENTRY_BYTES,
            RecordType::Snapshot => MAX_EXPANDED,
            _ => {
                return Err(CodecError::Decompress(format!(
                    "a {ty:?} record is never stored compressed"
                )));
            }
        };
        let json = expand(body, limit)?;
        return serde_json::from_slice(&json).map_err(|e| CodecError::Body(e.to_string()));
    }
    serde_json::from_slice(body).map_err(|e| CodecError::Body(e.to_string()))
}

/// Decompresses a body, refusing one whose declared size is missing or past `limit`.
fn expand(body: &[u8], limit: usize) -> Result<Vec<u8>, CodecError> {
    let size = zstd::zstd_safe::get_frame_content_size(body)
        .map_err(|e| CodecError::Decompress(format!("no content size: {e:?}")))?
        .ok_or_else(|| CodecError::Decompress("no content size".into()))?;
    let size = usize::try_from(size)
        .ok()
        .filter(|s| *s <= limit)
        .ok_or_else(|| CodecError::Decompress(format!("declares {size} bytes, over {limit}")))?;
    let out =
        zstd::bulk::decompress(body, size).map_err(|e| CodecError::Decompress(e.to_string()))?;
    if out.len() != size {
        return Err(CodecError::Decompress(format!(
            "expanded to {} bytes, declared {size}",
            out.len()
        )));
    }
    Ok(out)
}

/// Encodes a journal entry (compressed if large, see [`COMPRESS_ABOVE`]).
pub fn encode_entry(entry: &Entry) -> Result<Vec<u8>, CodecError> {
    Ok(encode_sized(RecordType::Entry, entry, true)?.frame)
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

/// Encodes a snapshot (compressed if large, see [`COMPRESS_ABOVE`]).
pub fn encode_snapshot(snapshot: &Snapshot) -> Result<Vec<u8>, CodecError> {
    Ok(encode_sized(RecordType::Snapshot, snapshot, true)?.frame)
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

    /// A float comes back from a frame exactly as it went in (serde_json's `float_roundtrip`):
    /// a live run and its replay see the same activity output, state and reply. Without it,
    /// 3.0 * 0.07 = 0.21000000000000002 came back as 0.21.
    #[test]
    fn floats_come_back_exactly() {
        let floats = [
            3.0 * 0.07,
            0.1 + 0.2,
            1.0 / 3.0,
            f64::MAX,
            f64::MIN_POSITIVE,
            5e-324,
        ];
        let e = Entry::new(
            7,
            EntryKind::Completed {
                reply: serde_json::json!(floats),
            },
        );
        let back: Entry =
            decode(RecordType::Entry, &encode(RecordType::Entry, &e).unwrap()).unwrap();
        let EntryKind::Completed { reply } = back.kind else {
            panic!("{back:?}")
        };
        let back: Vec<f64> = serde_json::from_value(reply).unwrap();
        for (a, b) in floats.iter().zip(&back) {
            assert_eq!(a.to_bits(), b.to_bits(), "{a:?} came back as {b:?}");
        }
    }

    /// The depth scan counts arrays and objects, not brackets inside strings (escaped quotes
    /// included), and agrees with what serde_json reads back.
    #[test]
    fn json_depth_counts_containers_not_brackets_in_strings() {
        assert_eq!(json_depth(br#"1"#), 0);
        assert_eq!(json_depth(br#"{"a":[1,{"b":[]}]}"#), 4);
        assert_eq!(json_depth(br#"["[[[{", "\"[[", {"k\"}": "]]"}]"#), 2);
        let nested = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        let limit = crate::limits::READ_JSON_DEPTH;
        for n in [limit - 1, limit, limit + 1] {
            let text = nested(n);
            assert_eq!(json_depth(text.as_bytes()), n);
            let read = serde_json::from_str::<serde_json::Value>(&text);
            assert_eq!(read.is_ok(), n <= limit, "{n} levels: {read:?}");
        }
    }
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

    fn large() -> Entry {
        let rows: Vec<_> = (0..400)
            .map(|i| serde_json::json!({"id": i, "name": format!("customer-{i}"), "ok": true}))
            .collect();
        Entry::new(7, EntryKind::Completed { reply: rows.into() })
    }

    #[test]
    fn large_entries_are_compressed_and_read_back() {
        let e = large();
        let enc = encode_sized(RecordType::Entry, &e, true).unwrap();
        assert!(enc.is_compressed());
        assert_eq!(enc.frame[0], FORMAT_ZSTD);
        assert!(
            enc.frame.len() * 3 < enc.plain_len,
            "{} of {}",
            enc.frame.len(),
            enc.plain_len
        );
        assert_eq!(enc.plain_len, encode(RecordType::Entry, &e).unwrap().len());
        assert_eq!(decode_entry(7, &enc.frame).unwrap(), e);
        // A plain frame of the same entry (as an older build wrote it) still reads.
        assert_eq!(
            decode_entry(7, &encode(RecordType::Entry, &e).unwrap()).unwrap(),
            e
        );
        // Small entries stay plain JSON.
        assert!(
            !encode_sized(RecordType::Entry, &entry(), true)
                .unwrap()
                .is_compressed()
        );
    }

    #[test]
    fn every_flipped_bit_of_a_compressed_frame_is_detected() {
        let bytes = encode_entry(&large()).unwrap();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 1 << (i % 8);
            assert!(decode_entry(7, &b).is_err(), "flip at byte {i} passed");
        }
    }

    #[test]
    fn a_compressed_body_declaring_a_huge_size_is_refused() {
        // A zstd frame header (magic, a single-segment descriptor with an 8-byte content
        // size) that claims 1 GiB: refused before anything is allocated.
        let mut body = vec![0x28, 0xB5, 0x2F, 0xFD, 0xE0];
        body.extend_from_slice(&(1u64 << 30).to_le_bytes());
        let mut frame = vec![FORMAT_ZSTD, b'E'];
        frame.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        frame.extend_from_slice(&body);
        assert!(matches!(
            decode_entry(7, &frame),
            Err(CodecError::Decompress(_))
        ));
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
        future[0] = 3;
        assert_eq!(
            decode_entry(7, &future),
            Err(CodecError::UnknownVersion { found: 3 })
        );
    }
}
