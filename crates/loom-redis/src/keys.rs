//! Key names. Every key starts with the store's prefix. In a store of one partition an actor's
//! keys share one hash tag (the part in braces), its id; in a store of several, every key a
//! script of partition `p` touches — its actors' journals, mailboxes, leases, idempotency
//! records, parks, and the partition's own indexes, dead letters and outbox — has the tag
//! `{_p.<p>}` (the actor's id follows in a second pair of braces, which Redis does not hash),
//! so that in a cluster a partition lives in one slot and a turn touches one slot. The full
//! layout, with what each key holds, is at the top of `loom.lua`.

use loom_core::partition::{ownership_partitions, partition_of};
use loom_core::store::Lease;
use loom_core::store::backend::{FenceOf, fence_of};
use loom_core::{ActorId, IdempotencyKey, StoreResult};

/// Key names under one prefix.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
    /// The store's partitions (1 unless it was created with more; `lib.rs`).
    partitions: u32,
}

/// [`Keys::format`] of the store under `prefix`, for a connect that reads it before it knows
/// the store's partitions.
pub(crate) fn format_key(prefix: &str) -> String {
    format!("{prefix}:format")
}

/// [`Keys::read_mark`] of the store under `prefix`.
pub(crate) fn read_mark_key(prefix: &str) -> String {
    format!("{prefix}:read-mark")
}

/// An actor's journal keys.
pub(crate) struct JournalKeys {
    pub(crate) j: String,
    pub(crate) jm: String,
    pub(crate) sn: String,
    pub(crate) sz: String,
}

/// Where a mailbox's buried messages go ([`Keys::dead_letters_of`]).
pub(crate) struct DeadLetterKeys {
    pub(crate) dl: String,
    pub(crate) seq: String,
    pub(crate) n: u32,
    pub(crate) p: u32,
}

/// An actor's mailbox keys.
pub(crate) struct MailboxKeys {
    pub(crate) mm: String,
    pub(crate) mq: String,
    pub(crate) md: String,
    pub(crate) mdx: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str, partitions: u32) -> Self {
        Keys {
            prefix: prefix.to_owned(),
            partitions,
        }
    }

    /// The store's partitions: a turn writes only its actor's partition, and a message to an
    /// actor of another goes through the sender's partition's outbox (`relay.rs`).
    pub(crate) fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The partitions nodes own and the ready index is cut into: the store's own if it has
    /// several, else [`loom_core::partition::SHARED_STORE_PARTITIONS`].
    pub(crate) fn ownership(&self) -> u32 {
        ownership_partitions(self.partitions)
    }

    /// Partition `p`'s own key `suffix`, under its hash tag (actor ids hold a `/`, so no
    /// actor's tag is one of these).
    fn partition(&self, p: u32, suffix: &str) -> String {
        format!("{}:{{_p.{p}}}:{suffix}", self.prefix)
    }

    /// A key of partition `p` that a store of one partition keeps once, as `P:<name>`.
    fn per_partition(&self, p: u32, name: &str) -> String {
        format!("{}:{name}", self.start(p))
    }

    /// Partition `p`'s outbox (a stream, ids `<outbox seq>-0`) and its meta (a hash: `s`, the
    /// last outbox seq given).
    pub(crate) fn outbox(&self, p: u32) -> (String, String) {
        (self.partition(p, "ob"), self.partition(p, "obm"))
    }

    /// Partition `q`'s high-water marks: a hash, source partition -> the last outbox seq of
    /// it that the relay enqueued into `q`.
    pub(crate) fn high_water(&self, q: u32) -> String {
        self.partition(q, "hw")
    }

    /// The partition `actor`'s keys are in: its placement, which for a partition's lease (the
    /// system actor `_partition/<kind>.<p>`) is that partition, so that the lease fencing a
    /// turn is in the turn's slot, and for an event lane its owner's.
    pub(crate) fn partition_of(&self, actor: &ActorId) -> u32 {
        partition_of(actor, self.partitions)
    }

    /// Where a key of partition `p` starts: the prefix, and in a store of several partitions
    /// the partition's hash tag.
    fn start(&self, p: u32) -> String {
        if self.partitions == 1 {
            self.prefix.clone()
        } else {
            format!("{}:{{_p.{p}}}", self.prefix)
        }
    }

    fn actor(&self, actor: &ActorId, suffix: &str) -> String {
        let start = self.start(self.partition_of(actor));
        let id = actor.as_str();
        // Braces inside the tag would change which part Redis hashes; such ids are hex-encoded.
        if id.contains(['{', '}']) {
            let hex: String = id.bytes().map(|b| format!("{b:02x}")).collect();
            format!("{start}:{{x{hex}}}:{suffix}")
        } else {
            format!("{start}:{{{id}}}:{suffix}")
        }
    }

    pub(crate) fn journal(&self, a: &ActorId) -> JournalKeys {
        JournalKeys {
            j: self.actor(a, "j"),
            jm: self.actor(a, "jm"),
            sn: self.actor(a, "sn"),
            sz: self.actor(a, "sz"),
        }
    }

    pub(crate) fn mailbox(&self, a: &ActorId) -> MailboxKeys {
        MailboxKeys {
            mm: self.actor(a, "mm"),
            mq: self.actor(a, "mq"),
            md: self.actor(a, "md"),
            mdx: self.actor(a, "mdx"),
        }
    }

    pub(crate) fn lease(&self, a: &ActorId) -> (String, String) {
        (self.actor(a, "ls"), self.actor(a, "lt"))
    }

    /// The keys a write of `a` fenced by `fence` checks (rule D8; `fence_held` in `loom.lua`):
    /// the fence's lease (the actor's own without a fence, unread then), and the actor's own
    /// when the fence is its partition's. A fence that is neither is refused.
    pub(crate) fn fence(
        &self,
        a: &ActorId,
        fence: Option<&Lease>,
    ) -> StoreResult<(String, Option<String>)> {
        let Some(fence) = fence else {
            return Ok((self.lease(a).0, None));
        };
        let own = match fence_of(a, fence, self.partitions)? {
            FenceOf::Own => None,
            FenceOf::Partition => Some(self.lease(a).0),
        };
        Ok((self.lease(&fence.actor).0, own))
    }

    pub(crate) fn idempotency(&self, a: &ActorId, key: &IdempotencyKey) -> String {
        self.actor(a, &format!("i:{key}"))
    }

    /// Partition `p`'s journals, for listing (the one set of a store of one partition).
    pub(crate) fn actors(&self, p: u32) -> String {
        self.per_partition(p, "actors")
    }

    /// The set listing `a`'s journal.
    pub(crate) fn actors_of(&self, a: &ActorId) -> String {
        self.actors(self.partition_of(a))
    }

    /// The ready index of one partition of one actor kind, among the
    /// [`ownership`](Self::ownership) partitions that nodes own (kinds are `[A-Za-z0-9_.-]`, safe in a key
    /// name): a node scans only those of the partitions it owns.
    pub(crate) fn ready_in(&self, kind: &str, partition: u32) -> String {
        if self.partitions == 1 {
            format!("{}:ready:{kind}:{partition}", self.prefix)
        } else {
            // The ownership partitions are the store's own: the index lives in its partition.
            self.partition(partition, &format!("ready:{kind}"))
        }
    }

    /// The ready index that lists `actor` when its mailbox has something.
    pub(crate) fn ready(&self, actor: &ActorId) -> String {
        self.ready_in(actor.kind(), partition_of(actor, self.ownership()))
    }

    /// Whether `key`, found by [`ready_pattern`](Self::ready_pattern), is a ready index: in a
    /// store of several partitions the pattern also matches actors' keys whose names end so
    /// (an idempotency key may hold `}:ready:`), which are not.
    pub(crate) fn is_ready_index(&self, key: &str) -> bool {
        let kind_ok = |k: &str| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-:".contains(c))
        };
        if self.partitions == 1 {
            return key
                .strip_prefix(&self.prefix)
                .and_then(|k| k.strip_prefix(":ready:"))
                .is_some_and(kind_ok);
        }
        let Some(rest) = key
            .strip_prefix(&self.prefix)
            .and_then(|k| k.strip_prefix(":{_p."))
        else {
            return false;
        };
        let Some((p, kind)) = rest.split_once("}:ready:") else {
            return false;
        };
        p.parse::<u32>().is_ok_and(|p| p < self.partitions) && !kind.contains(':') && kind_ok(kind)
    }

    /// Matches every ready index (and the per-kind ones of older layouts).
    pub(crate) fn ready_pattern(&self) -> String {
        if self.partitions == 1 {
            format!("{}:ready:*", self.prefix)
        } else {
            format!("{}:{{_p.*}}:ready:*", self.prefix)
        }
    }

    /// The per-kind ready index of layouts before per-partition ones (moved at connect; see
    /// `lib.rs`): `Some(kind)` if `key` is one.
    pub(crate) fn kind_ready_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        let kind = key.strip_prefix(&self.prefix)?.strip_prefix(":ready:")?;
        (!kind.is_empty() && !kind.contains(':')).then_some(kind)
    }

    /// What layout the store's keys are in (`LAYOUT` in `lib.rs`), once an upgrade has moved
    /// what older builds kept in another shape.
    pub(crate) fn layout(&self) -> String {
        format!("{}:layout", self.prefix)
    }

    /// The store's key prefix.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A key written only so that a wait for replicas covers what a read just saw
    /// (`RedisStore::replicated_as_read`).
    pub(crate) fn read_mark(&self) -> String {
        read_mark_key(&self.prefix)
    }

    /// The store's stored format (`STORED_FORMAT` in `lib.rs`).
    pub(crate) fn format(&self) -> String {
        format_key(&self.prefix)
    }

    /// The ready index of layouts before per-kind ones (moved at connect; see `lib.rs`).
    pub(crate) fn legacy_ready(&self) -> String {
        format!("{}:ready", self.prefix)
    }

    /// The actor's park record.
    pub(crate) fn park(&self, a: &ActorId) -> String {
        self.actor(a, "pk")
    }

    /// Partition `p`'s parked actors (a sorted set, score 0, for listing in id order).
    pub(crate) fn parked(&self, p: u32) -> String {
        self.per_partition(p, "parked")
    }

    /// The set listing `a` while it is parked.
    pub(crate) fn parked_of(&self, a: &ActorId) -> String {
        self.parked(self.partition_of(a))
    }

    /// The pub/sub channel of recorded results (not a key: nothing is stored under it).
    pub(crate) fn done(&self) -> String {
        format!("{}:done", self.prefix)
    }

    /// The pub/sub channel of wake-ups (`signals.rs`).
    pub(crate) fn wake(&self) -> String {
        format!("{}:wake", self.prefix)
    }

    /// Every node's membership record (a hash, node -> record).
    pub(crate) fn members(&self) -> String {
        format!("{}:members", self.prefix)
    }

    /// Partition `p`'s dead letters (a stream, ids `<dead letter id>-0`).
    pub(crate) fn dead_letters(&self, p: u32) -> String {
        self.per_partition(p, "dl")
    }

    /// Where a message of `a`'s mailbox goes when it is buried: the stream, the counter of its
    /// ids, and the arguments `dl_of` (`loom.lua`) numbers them with — `n` and `p`, so that
    /// partition `p` of `n` gives ids `p + n`, `p + 2n`, … and an id says which partition
    /// holds it (`id % n`; a store of one partition gives 1, 2, …), as the embedded store's.
    pub(crate) fn dead_letters_of(&self, a: &ActorId) -> DeadLetterKeys {
        let p = self.partition_of(a);
        DeadLetterKeys {
            dl: self.dead_letters(p),
            seq: self.per_partition(p, "dlseq"),
            n: self.partitions,
            p,
        }
    }

    /// The partition holding dead letter `id`.
    pub(crate) fn partition_of_dead_letter(&self, id: u64) -> u32 {
        (id % u64::from(self.partitions)) as u32
    }

    /// Matches the mailbox meta key of every actor.
    pub(crate) fn mailbox_pattern(&self) -> String {
        if self.partitions == 1 {
            format!("{}:{{*}}:mm", self.prefix)
        } else {
            format!("{}:{{_p.*}}:{{*}}:mm", self.prefix)
        }
    }

    /// The actor whose key `key` is (the inverse of the naming above).
    pub(crate) fn actor_of(&self, key: &str) -> Option<ActorId> {
        let mut rest = key.strip_prefix(&self.prefix)?;
        if self.partitions > 1 {
            let tagged = rest.strip_prefix(":{_p.")?;
            rest = &tagged[tagged.find('}')? + 1..];
        }
        let rest = rest.strip_prefix(":{")?;
        let end = rest.rfind("}:")?;
        let tag = &rest[..end];
        if tag.contains('/') {
            return tag.parse().ok();
        }
        // Hex-encoded (the id had braces): "x" then two hex digits per byte.
        let hex = tag.strip_prefix('x')?;
        let bytes: Option<Vec<u8>> = (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .collect();
        String::from_utf8(bytes?).ok()?.parse().ok()
    }

    /// Every key of this prefix matches this pattern (for tools that clean up a prefix).
    pub(crate) fn pattern(&self) -> String {
        format!("{}:*", self.prefix)
    }
}

/// The part of `key` Redis Cluster hashes: what the first `{` and the next `}` enclose, if
/// that is not empty, else the whole key.
pub(crate) fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{')
        && let Some(len) = key[open + 1..].find('}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

/// Whether `keys` all hash to one slot by their tags (what a script may touch on a cluster).
pub(crate) fn one_slot(keys: &[impl AsRef<str>]) -> bool {
    keys.windows(2)
        .all(|w| hash_tag(w[0].as_ref()) == hash_tag(w[1].as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_actors_keys_share_one_tag_and_braces_are_encoded() {
        let k = Keys::new("p", 1);
        let a = ActorId::new("acct", "alice").unwrap();
        assert_eq!(k.journal(&a).j, "p:{acct/alice}:j");
        assert_eq!(k.mailbox(&a).mm, "p:{acct/alice}:mm");
        let b = ActorId::new("acct", "we}ird{").unwrap();
        let j = k.journal(&b).j;
        assert!(
            j.starts_with("p:{x") && j.ends_with("}:j") && j.matches('{').count() == 1,
            "{j}"
        );
        assert_eq!(k.actor_of(&k.mailbox(&b).mm), Some(b));
        assert_eq!(k.actor_of(&k.mailbox(&a).mm), Some(a));
    }

    #[test]
    fn in_a_partitioned_store_every_key_of_a_partition_has_its_tag() {
        let k = Keys::new("p", 4);
        let a = ActorId::new("acct", "alice").unwrap();
        let p = partition_of(&a, 4);
        let tag = format!("p:{{_p.{p}}}:");
        let dl = k.dead_letters_of(&a);
        let (ls, _) = k.lease(&a);
        let lease = ActorId::partition_lease("acct", p);
        for key in [
            k.journal(&a).j,
            k.mailbox(&a).mm,
            k.idempotency(&a, &IdempotencyKey::new("x").unwrap()),
            k.park(&a),
            ls,
            k.lease(&lease).0,
            k.actors_of(&a),
            k.parked_of(&a),
            k.ready(&a),
            dl.dl,
            dl.seq,
            k.outbox(p).0,
            k.high_water(p),
        ] {
            assert!(key.starts_with(&tag), "{key} is not in {tag}");
            assert_eq!(key.matches('{').count(), key.matches('}').count(), "{key}");
        }
        assert_eq!(k.journal(&a).j, format!("{tag}{{acct/alice}}:j"));
        assert_eq!((dl.n, dl.p), (4, p));
        assert_eq!(k.partition_of_dead_letter(u64::from(p) + 8), p);
        let b = ActorId::new("acct", "we}ird{").unwrap();
        assert_eq!(k.actor_of(&k.mailbox(&b).mm), Some(b));
        assert_eq!(k.actor_of(&k.mailbox(&a).mm), Some(a.clone()));
        assert_eq!(k.actor_of(&k.outbox(p).0), None);
        assert_eq!(hash_tag(&k.journal(&a).j), format!("_p.{p}"));
        assert!(k.is_ready_index(&k.ready(&a)));
        let tricky = k.idempotency(&a, &IdempotencyKey::new("x}:ready:acct").unwrap());
        assert!(
            tricky.ends_with(":ready:acct") && !k.is_ready_index(&tricky),
            "{tricky}"
        );
        assert!(Keys::new("p", 1).is_ready_index(&Keys::new("p", 1).ready(&a)));
        assert_eq!(hash_tag("p:{}:x{y}"), "p:{}:x{y}");
        assert!(!one_slot(&[k.journal(&a).j, k.outbox((p + 1) % 4).0]));
    }
}
