-- Version 8: the ready index per kind and partition. Nodes own partitions of each kind
-- (loom_core::partition::SHARED_STORE_PARTITIONS = 32, runtime/ownership.rs), and a node's ready
-- scan now looks only in the partitions it owns, so that no backlog of another node's
-- partitions hides its own ready actors. Stop the nodes of older builds before the first node
-- of this one connects (their functions are replaced here).

-- The partition of an actor among 32: FNV-1a 64 of the id's UTF-8 bytes, mod 32, as
-- loom_core::partition::partition_of computes it. Multiplying modulo 2^64 keeps the low five
-- bits a function of the low five bits of each factor, so those are all this needs (offset
-- basis 0xcbf29ce484222325 & 31 = 5, prime 0x100000001b3 & 31 = 19); it is right only for a
-- power of two up to 2^64, which 32 is. The Rust tests check it against partition_of.
CREATE OR REPLACE FUNCTION {s}.part_of(p_actor text) RETURNS integer
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    b bytea := convert_to(p_actor, 'UTF8');
    h integer := 5;
BEGIN
    FOR i IN 0 .. length(b) - 1 LOOP
        h := ((h # (get_byte(b, i) & 31)) * 19) & 31;
    END LOOP;
    RETURN h;
END $$;

ALTER TABLE {s}.mailbox ADD COLUMN IF NOT EXISTS part integer;
UPDATE {s}.mailbox SET part = {s}.part_of(actor) WHERE part IS NULL;
ALTER TABLE {s}.mailbox ALTER COLUMN part SET NOT NULL;

-- Replaces the (kind, ready_at) index: backlog(kind) reads this one's leading column.
CREATE INDEX IF NOT EXISTS mailbox_part_ready ON {s}.mailbox (split_part(actor, '/', 1), part, ready_at)
    WHERE ready_at IS NOT NULL;
DROP INDEX IF EXISTS {s}.mailbox_kind_ready;

-- As version 7's, with the row's partition.
CREATE OR REPLACE FUNCTION {s}.mb_row(p_actor text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM {s}.mailbox WHERE actor = p_actor) THEN
        INSERT INTO {s}.mailbox (actor, last_position, current, ready_at, count, last_due, part)
        VALUES (p_actor, 0, 0, NULL, 0, 0, {s}.part_of(p_actor)) ON CONFLICT (actor) DO NOTHING;
    END IF;
END $$;
