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
    fn counts_are_checked() {
        assert!(check_partitions(0).is_err());
        assert!(check_partitions(MAX_PARTITIONS + 1).is_err());
        assert_eq!(check_partitions(2).unwrap(), 2);
        assert!((1..=MAX_PARTITIONS).contains(&default_partitions()));
    }
}
