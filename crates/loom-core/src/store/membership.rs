//! [`Membership`]: which nodes share a store, which actor kinds each hosts, and which of them
//! are alive, as every node and `loom cluster status` read it from the store.
//!
//! A node announces itself with a [`heartbeat`](Membership::heartbeat) every third of its
//! `ttl`; a node whose last heartbeat is more than `ttl` old is *gone* (crashed, cut off, or
//! stopped without [`leave`](Membership::leave)), and is forgotten [`FORGET_AFTER_TTLS`] of its
//! ttls after its last heartbeat. Liveness is judged on the store's clock (the server's for
//! Redis and PostgreSQL), never a node's own, so a node with a skewed clock neither looks dead
//! nor keeps a dead one alive.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::codec::{self, RecordType};
use crate::error::{StoreError, StoreResult};
use crate::store::backend::{check_owner, check_ttl};
use crate::time::Timestamp;

/// Most actor kinds one node may announce.
pub const MAX_NODE_KINDS: usize = 1024;

/// A gone node is forgotten (no longer listed) this many of its ttls after its last heartbeat:
/// with the runtime's 10 s lease ttl, it is listed as gone for 90 s.
pub const FORGET_AFTER_TTLS: u32 = 10;

/// One node's announcement, as the store keeps it.
///
/// ```
/// use std::time::Duration;
/// use loom_core::Timestamp;
/// use loom_core::store::Member;
///
/// let m = Member {
///     node: "web-1".into(),
///     incarnation: 7,
///     kinds: vec!["account".into()],
///     joined_at: Timestamp::from_millis(1_000),
///     beat_at: Timestamp::from_millis(5_000),
///     ttl: Duration::from_secs(10),
/// };
/// assert_eq!(m.expires_at(), Timestamp::from_millis(15_000));
/// assert!(m.is_live(Timestamp::from_millis(14_999)));
/// assert!(!m.is_live(Timestamp::from_millis(15_000)));
/// assert!(m.hosts("account") && !m.hosts("ledger"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The node's name (the runtime's `Config::node`).
    pub node: String,
    /// Which process under that name: chosen at random when a process starts, so that a second
    /// process started under a live node's name is refused ([`StoreError::NodeTaken`]).
    pub incarnation: u64,
    /// The actor kinds it hosts, sorted, without repeats; empty for a client-only node.
    pub kinds: Vec<String>,
    /// When this incarnation first announced itself (store clock).
    pub joined_at: Timestamp,
    /// Its last heartbeat (store clock).
    pub beat_at: Timestamp,
    /// How long after `beat_at` it counts as alive.
    #[serde(with = "millis")]
    pub ttl: Duration,
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

impl Member {
    /// When it stops counting as alive unless it beats again.
    pub fn expires_at(&self) -> Timestamp {
        self.beat_at + self.ttl
    }

    /// Alive at `now` (store clock): its last heartbeat is less than its ttl old.
    pub fn is_live(&self, now: Timestamp) -> bool {
        now < self.expires_at()
    }

    /// When the store stops listing it: [`FORGET_AFTER_TTLS`] ttls after its last heartbeat.
    pub fn forgotten_at(&self) -> Timestamp {
        self.beat_at + self.ttl.saturating_mul(FORGET_AFTER_TTLS)
    }

    /// True if it announced `kind`.
    pub fn hosts(&self, kind: &str) -> bool {
        self.kinds
            .binary_search_by(|k| k.as_str().cmp(kind))
            .is_ok()
    }

    /// Its frame (see [`crate::codec`]), as the embedded store keeps it.
    pub fn encode(&self) -> StoreResult<Vec<u8>> {
        codec::encode(RecordType::Member, self)
            .map_err(|e| StoreError::InvalidRequest(format!("member record: {e}")))
    }

    /// Reads a frame written by [`encode`](Self::encode).
    pub fn decode(bytes: &[u8]) -> StoreResult<Self> {
        codec::decode(RecordType::Member, bytes)
            .map_err(|e| StoreError::corrupt("member record", e))
    }
}

/// The nodes a store knows, as [`Membership::members`] read them: the live ones and those gone
/// but not yet forgotten, in node-name order, with the store's clock at the read.
///
/// ```
/// use std::time::Duration;
/// use loom_core::Timestamp;
/// use loom_core::store::{Member, Roster};
///
/// let member = |node: &str, kinds: &[&str], beat_ms| Member {
///     node: node.into(),
///     incarnation: 1,
///     kinds: kinds.iter().map(|k| k.to_string()).collect(),
///     joined_at: Timestamp::from_millis(0),
///     beat_at: Timestamp::from_millis(beat_ms),
///     ttl: Duration::from_secs(10),
/// };
/// let roster = Roster {
///     at: Timestamp::from_millis(20_000),
///     members: vec![member("a", &["account"], 15_000), member("b", &["ledger"], 5_000)],
/// };
/// assert_eq!(roster.live().map(|m| m.node.as_str()).collect::<Vec<_>>(), ["a"]);
/// assert_eq!(roster.hosts("account").count(), 1);
/// assert_eq!(roster.hosts("ledger").count(), 0); // its only host is gone
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roster {
    /// The store's clock when it read them.
    pub at: Timestamp,
    /// Every node not yet forgotten, live or gone, in node-name order.
    pub members: Vec<Member>,
}

impl Roster {
    /// The live nodes.
    pub fn live(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|m| m.is_live(self.at))
    }

    /// The live nodes hosting `kind`.
    pub fn hosts<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Member> + 'a {
        self.live().filter(move |m| m.hosts(kind))
    }
}

/// Node membership (see the module documentation).
///
/// Rules every backend keeps:
/// - [`heartbeat`](Self::heartbeat) writes the node's record with the store's clock, unless a
///   *live* record of that node has another incarnation: then it fails with
///   [`StoreError::NodeTaken`] and writes nothing. So two processes never announce one name
///   at once, and a restarted process under the name of a crashed one joins once the old record
///   is gone (at most one ttl). A heartbeat of the same incarnation keeps `joined_at`;
/// - [`leave`](Self::leave) removes the record only if it has the incarnation given;
/// - [`members`](Self::members) lists every record not yet forgotten
///   ([`Member::forgotten_at`] after the store's clock), and a heartbeat deletes the
///   forgotten ones, so the records a store keeps stay bounded by the nodes of the last few
///   ttls.
#[async_trait]
pub trait Membership: Send + Sync + 'static {
    /// Announces `node` (incarnation `incarnation`) alive for `ttl` from now, hosting `kinds`
    /// (valid kind names, at most [`MAX_NODE_KINDS`]; stored sorted and without repeats);
    /// returns the record as stored.
    async fn heartbeat(
        &self,
        node: &str,
        incarnation: u64,
        kinds: &[&str],
        ttl: Duration,
    ) -> StoreResult<Member>;

    /// Removes `node`'s record if it is of `incarnation`; false (nothing written) otherwise.
    async fn leave(&self, node: &str, incarnation: u64) -> StoreResult<bool>;

    /// Every node not yet forgotten, with the store's clock.
    async fn members(&self) -> StoreResult<Roster>;
}

/// Checks a heartbeat's arguments, as every backend does before it writes: the node name (as
/// a lease owner's), the ttl (positive, at most a day), and the kinds; returns the kinds
/// sorted and without repeats, and the ttl in whole milliseconds (rounded up), as every
/// backend stores it.
pub fn prepare_heartbeat(
    node: &str,
    kinds: &[&str],
    ttl: Duration,
) -> StoreResult<(Vec<String>, Duration)> {
    check_owner(node)?;
    check_ttl("membership ttl", ttl)?;
    if ttl > Duration::from_secs(24 * 3600) {
        return Err(StoreError::InvalidRequest(format!(
            "membership ttl {ttl:?} is over the limit of one day"
        )));
    }
    let mut out: Vec<String> = Vec::with_capacity(kinds.len());
    for k in kinds {
        crate::id::check_kind(k)?;
        out.push((*k).to_owned());
    }
    out.sort();
    out.dedup();
    if out.len() > MAX_NODE_KINDS {
        return Err(StoreError::TooLarge {
            what: format!("the kinds of node {node}"),
            size: out.len(),
            limit: MAX_NODE_KINDS,
            limit_kind: crate::error::Limit::NodeKinds,
        });
    }
    let ms = u64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    Ok((out, Duration::from_millis(ms)))
}

/// The record a heartbeat writes over `existing` (the node's current record, if any) at `now`,
/// or [`StoreError::NodeTaken`]: the rule of [`Membership::heartbeat`], once, for the stores
/// that run it in Rust (the embedded and simulated ones; Redis and PostgreSQL keep the same
/// rule in their scripts).
pub fn beat(
    existing: Option<&Member>,
    node: &str,
    incarnation: u64,
    kinds: Vec<String>,
    ttl: Duration,
    now: Timestamp,
) -> StoreResult<Member> {
    let joined_at = match existing {
        Some(m) if m.incarnation == incarnation => m.joined_at,
        Some(m) if m.is_live(now) => {
            return Err(StoreError::NodeTaken {
                node: node.to_owned(),
                incarnation: m.incarnation,
                remaining_ms: m.expires_at().as_millis().saturating_sub(now.as_millis()),
            });
        }
        _ => now,
    };
    Ok(Member {
        node: node.to_owned(),
        incarnation,
        kinds,
        joined_at,
        beat_at: now,
        ttl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(incarnation: u64, beat_ms: u64) -> Member {
        Member {
            node: "n".into(),
            incarnation,
            kinds: vec![],
            joined_at: Timestamp::from_millis(100),
            beat_at: Timestamp::from_millis(beat_ms),
            ttl: Duration::from_millis(1_000),
        }
    }

    #[test]
    fn a_live_record_of_another_incarnation_refuses_the_name() {
        let now = Timestamp::from_millis(1_500);
        let old = member(1, 1_000);
        match beat(Some(&old), "n", 2, vec![], Duration::from_secs(1), now) {
            Err(StoreError::NodeTaken {
                incarnation: 1,
                remaining_ms: 500,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        // The same incarnation beats and keeps when it joined.
        let m = beat(Some(&old), "n", 1, vec![], Duration::from_secs(1), now).unwrap();
        assert_eq!((m.joined_at, m.beat_at), (Timestamp::from_millis(100), now));
        // Once the old record is gone, a new incarnation joins afresh.
        let later = Timestamp::from_millis(2_000);
        let m = beat(Some(&old), "n", 2, vec![], Duration::from_secs(1), later).unwrap();
        assert_eq!((m.incarnation, m.joined_at), (2, later));
    }

    #[test]
    fn heartbeat_arguments_are_checked() {
        let ttl = Duration::from_secs(1);
        let (kinds, whole) = prepare_heartbeat("n", &["b", "a", "b"], ttl).unwrap();
        assert_eq!((kinds, whole), (vec!["a".to_owned(), "b".to_owned()], ttl));
        let (_, up) = prepare_heartbeat("n", &[], Duration::from_micros(1_500)).unwrap();
        assert_eq!(
            up,
            Duration::from_millis(2),
            "rounded up to whole milliseconds"
        );
        assert!(prepare_heartbeat("", &[], ttl).is_err());
        assert!(prepare_heartbeat("n", &["a/b"], ttl).is_err());
        assert!(prepare_heartbeat("n", &[], Duration::ZERO).is_err());
        assert!(prepare_heartbeat("n", &[], Duration::from_secs(90_000)).is_err());
        let many: Vec<String> = (0..=MAX_NODE_KINDS).map(|i| format!("k{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(matches!(
            prepare_heartbeat("n", &many, ttl),
            Err(StoreError::TooLarge { .. })
        ));
    }

    #[test]
    fn records_round_trip_and_are_forgotten_after_ten_ttls() {
        let m = member(3, 1_000);
        assert_eq!(Member::decode(&m.encode().unwrap()).unwrap(), m);
        assert_eq!(m.forgotten_at(), Timestamp::from_millis(11_000));
    }
}
