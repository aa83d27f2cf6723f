-- Version 6: node membership (Membership): which nodes share the store, the kinds each hosts,
-- and their last heartbeat, judged on the server's clock. Every statement can run again on a
-- schema that has it.

-- One row per node not yet forgotten. incarnation is the u64 as the bits of a bigint.
CREATE TABLE IF NOT EXISTS {s}.members (
    node text PRIMARY KEY,
    incarnation bigint NOT NULL,
    kinds text NOT NULL,
    joined_ms bigint NOT NULL,
    beat_ms bigint NOT NULL,
    ttl_ms bigint NOT NULL
);

-- Writes p_node's record unless a live record of it has another incarnation: then status
-- 'taken', a = its incarnation, b = the milliseconds it has left, and nothing is written.
-- Else status 'ok', a = when this incarnation joined, b = now; and the records forgotten
-- (p_forget ttls after their last beat) are deleted. The check is in the upsert's WHERE, so
-- two first heartbeats racing for one name cannot both win.
CREATE OR REPLACE FUNCTION {s}.heartbeat(p_node text, p_inc bigint, p_ttl bigint, p_kinds text,
    p_forget integer, OUT status text, OUT a bigint, OUT b bigint)
LANGUAGE plpgsql AS $$
DECLARE now bigint := {s}.now_ms();
BEGIN
    INSERT INTO {s}.members AS m (node, incarnation, kinds, joined_ms, beat_ms, ttl_ms)
    VALUES (p_node, p_inc, p_kinds, now, now, p_ttl)
    ON CONFLICT (node) DO UPDATE SET
        joined_ms = CASE WHEN m.incarnation = p_inc THEN m.joined_ms ELSE now END,
        incarnation = p_inc, kinds = p_kinds, beat_ms = now, ttl_ms = p_ttl
    WHERE m.incarnation = p_inc OR m.beat_ms + m.ttl_ms <= now
    RETURNING m.joined_ms INTO a;
    IF NOT FOUND THEN
        SELECT 'taken', m.incarnation, m.beat_ms + m.ttl_ms - now INTO status, a, b
        FROM {s}.members m WHERE m.node = p_node;
        RETURN;
    END IF;
    DELETE FROM {s}.members m WHERE m.node <> p_node AND m.beat_ms + m.ttl_ms * p_forget <= now;
    status := 'ok';
    b := now;
END $$;
