//! Partitions: which of a store's `P` partitions an actor lives in.
//!
//! A store is cut into `P` partitions, fixed when it is created and recorded in it. Everything
//! of one actor — its journal, snapshots, mailbox, lease, idempotency records, park and event
//! lanes — lives in the one partition its id hashes to, so that a turn writes only there. A
//! message to an actor of another partition leaves through the sender partition's **outbox**
//! and is moved by that partition's relay (see DESIGN.md, "How a message travels").
//!
//! The hash is FNV-1a (64 bit) of the actor id's bytes (`kind/key`), taken modulo `P`. It is
//! part of the store format: never change it, or an existing store's actors are looked for in
//! the wrong partition. An event lane of a partitioned store ([`ActorId::event_lane_in`])
//! carries its owner's hash in its key, so it lands in its owner's partition.
//!
//! ```
//! use loom_core::ActorId;
//! use loom_core::partition::partition_of;
//!
//! let alice = ActorId::new("account", "alice")?;
//! let p = partition_of(&alice, 4);
//! assert!(p < 4);
//! // Stable: the same id, the same partition, in every process and build.
//! assert_eq!(p, partition_of(&alice, 4));
//! // An event lane goes where its actor is.
//! assert_eq!(partition_of(&alice.event_lane_in("approved", 4), 4), p);
//! // With one partition, everything is in partition 0.
//! assert_eq!(partition_of(&alice, 1), 0);
//! # Ok::<(), loom_core::IdError>(())
//! ```

use crate::id::ActorId;

/// The most partitions a store may have.
pub const MAX_PARTITIONS: u32 = 256;

/// The partition of `actor` in a store of `partitions` partitions (`partitions >= 1`; 0 is
/// taken as 1).
pub fn partition_of(actor: &ActorId, partitions: u32) -> u32 {
    if partitions <= 1 {
        return 0;
    }
    (actor.placement_hash() % u64::from(partitions)) as u32
}

/// FNV-1a, 64 bit: small, stable across builds and platforms, and good enough to spread ids.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The partition count a new store gets when none is asked for: the machine's cores (at least
/// 1, at most [`MAX_PARTITIONS`]).
pub fn default_partitions() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(MAX_PARTITIONS))
        .unwrap_or(1)
        .clamp(1, MAX_PARTITIONS)
}

/// How many partitions the nodes sharing a store of one partition (today's Redis and
/// PostgreSQL stores) divide among themselves: each kind's actors are cut into this many
/// groups by [`partition_of`], and each group has one owning node at a time (see
/// [`owner_of`]). A store of several partitions is owned by its own partitions.
///
/// Every node of a store must use the same count: an actor's turns are fenced by its
/// partition's lease (rule D8), so two nodes with different counts could each hold a different
/// lease that fences the same actor. Changing it is a change of the protocol between nodes:
/// every node of the older count must be stopped first.
pub const SHARED_STORE_PARTITIONS: u32 = 32;

/// The partitions nodes own on a store of `store_partitions` partitions: the store's own if it
/// has several, else [`SHARED_STORE_PARTITIONS`].
///
/// ```
/// use loom_core::partition::{ownership_partitions, SHARED_STORE_PARTITIONS};
///
/// assert_eq!(ownership_partitions(4), 4);
/// assert_eq!(ownership_partitions(1), SHARED_STORE_PARTITIONS);
/// ```
pub fn ownership_partitions(store_partitions: u32) -> u32 {
    if store_partitions > 1 {
        store_partitions
    } else {
        SHARED_STORE_PARTITIONS
    }
}

/// The node that owns `partition` of `kind` among `nodes` (the live nodes hosting `kind`):
/// rendezvous hashing, so every node that reads the same roster names the same owner, and a
/// node joining or leaving moves only the partitions it wins or held (about `1/n` of them).
/// `None` if `nodes` is empty. The weight of a (node, kind, partition) is FNV-1a of the three
/// (with separators), mixed; ties go to the greater name.
///
/// ```
/// use loom_core::partition::owner_of;
///
/// let nodes = ["a", "b", "c"];
/// let owner = owner_of(nodes, "account", 7).unwrap();
/// // The order the roster lists nodes in does not matter.
/// assert_eq!(owner_of(["c", "a", "b"], "account", 7), Some(owner));
/// // A node leaving moves only what it owned.
/// let rest: Vec<&str> = nodes.into_iter().filter(|n| *n != "b").collect();
/// if owner != "b" {
///     assert_eq!(owner_of(rest, "account", 7), Some(owner));
/// }
/// assert_eq!(owner_of([], "account", 7), None);
/// ```
pub fn owner_of<'a>(
    nodes: impl IntoIterator<Item = &'a str>,
    kind: &str,
    partition: u32,
) -> Option<&'a str> {
    nodes
        .into_iter()
        .max_by_key(|node| (weight(node, kind, partition), *node))
}

/// A (node, kind, partition)'s rendezvous weight: FNV-1a, finished with splitmix64's mixer,
/// so that names differing only in their last characters still spread.
fn weight(node: &str, kind: &str, partition: u32) -> u64 {
    let mut bytes = Vec::with_capacity(node.len() + kind.len() + 6);
    bytes.extend_from_slice(node.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(kind.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(&partition.to_le_bytes());
    let mut z = fnv1a(&bytes);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Checks a partition count asked for: `1..=`[`MAX_PARTITIONS`].
pub fn check_partitions(n: u32) -> crate::StoreResult<u32> {
    if n == 0 || n > MAX_PARTITIONS {
        return Err(crate::StoreError::InvalidRequest(format!(
            "a store has 1 to {MAX_PARTITIONS} partitions, not {n}"
        )));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_fnv1a_and_never_changes() {
        // Known FNV-1a 64 values: changing the function would move every stored actor.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        let alice = ActorId::new("account", "alice").unwrap();
        assert_eq!(alice.placement_hash(), fnv1a(b"account/alice"));
    }

    #[test]
    fn ids_spread_over_partitions() {
        let mut counts = [0u32; 4];
        for i in 0..4000 {
            let id = ActorId::new("account", format!("acct-{i}")).unwrap();
            counts[partition_of(&id, 4) as usize] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn lanes_follow_their_actor() {
        for i in 0..200 {
            let id = ActorId::new("order", format!("o{i}")).unwrap();
            for p in [2, 3, 7, 64] {
                assert_eq!(
                    partition_of(&id.event_lane_in("paid", p), p),
                    partition_of(&id, p)
                );
            }
        }
    }

    #[test]
    fn owners_spread_and_move_only_what_they_must() {
        let nodes: Vec<String> = (1..=4).map(|i| format!("node-{i}")).collect();
        let names = |n: usize| nodes[..n].iter().map(String::as_str).collect::<Vec<_>>();
        for kind in ["account", "transfer"] {
            let p = SHARED_STORE_PARTITIONS;
            let three: Vec<&str> = (0..p)
                .map(|i| owner_of(names(3), kind, i).unwrap())
                .collect();
            for n in names(3) {
                let owned = three.iter().filter(|o| **o == n).count();
                // 32 over 3: about 10.7 each; a hash this bad would fail.
                assert!(
                    (5..=17).contains(&owned),
                    "{kind}: {n} owns {owned}: {three:?}"
                );
            }
            // A fourth joins: it takes partitions, and every partition that moves moves to it.
            let four: Vec<&str> = (0..p)
                .map(|i| owner_of(names(4), kind, i).unwrap())
                .collect();
            let moved = (0..p as usize).filter(|i| three[*i] != four[*i]).count();
            assert!(moved > 0, "{kind}: the fourth node got nothing");
            for i in 0..p as usize {
                if three[i] != four[i] {
                    assert_eq!(four[i], "node-4");
                }
            }
            // The second leaves: only its partitions move.
            let without: Vec<&str> = names(3).into_iter().filter(|n| *n != "node-2").collect();
            for i in 0..p {
                let after = owner_of(without.iter().copied(), kind, i).unwrap();
                if three[i as usize] != "node-2" {
                    assert_eq!(after, three[i as usize]);
                }
            }
        }
    }

    #[test]
    fn counts_are_checked() {
        assert!(check_partitions(0).is_err());
        assert!(check_partitions(MAX_PARTITIONS + 1).is_err());
        assert_eq!(check_partitions(2).unwrap(), 2);
        assert!((1..=MAX_PARTITIONS).contains(&default_partitions()));
    }
}
