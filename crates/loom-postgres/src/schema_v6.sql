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
-- Else status 'ok', a = when this incarnation joined, b = now. The check is in the upsert's
-- WHERE, so two first heartbeats racing for one name cannot both win; a record that left
-- between the upsert and the look at it is tried again. First the records forgotten (p_forget
-- ttls after their last beat) are deleted, skipping any another heartbeat holds, so that two
-- heartbeats never wait for each other's rows.
CREATE OR REPLACE FUNCTION {s}.heartbeat(p_node text, p_inc bigint, p_ttl bigint, p_kinds text,
    p_forget integer, OUT status text, OUT a bigint, OUT b bigint)
LANGUAGE plpgsql AS $$
DECLARE now bigint := {s}.now_ms();
BEGIN
    DELETE FROM {s}.members WHERE node IN (
        SELECT m.node FROM {s}.members m
        WHERE m.node <> p_node AND m.beat_ms + m.ttl_ms * p_forget <= now
        FOR UPDATE SKIP LOCKED);
    LOOP
        INSERT INTO {s}.members AS m (node, incarnation, kinds, joined_ms, beat_ms, ttl_ms)
        VALUES (p_node, p_inc, p_kinds, now, now, p_ttl)
        ON CONFLICT (node) DO UPDATE SET
            joined_ms = CASE WHEN m.incarnation = p_inc THEN m.joined_ms ELSE now END,
            incarnation = p_inc, kinds = p_kinds, beat_ms = now, ttl_ms = p_ttl
        WHERE m.incarnation = p_inc OR m.beat_ms + m.ttl_ms <= now
        RETURNING m.joined_ms INTO a;
        IF FOUND THEN
            status := 'ok';
            b := now;
            RETURN;
        END IF;
        SELECT 'taken', m.incarnation, m.beat_ms + m.ttl_ms - now INTO status, a, b
        FROM {s}.members m WHERE m.node = p_node;
        IF FOUND THEN RETURN; END IF;
    END LOOP;
END $$;

-- As in version 1, and: a NOTIFY on the schema's reply channel, "<actor>\n<key>", for nodes
-- waiting for this reply (IdempotencyStore::completions). Delivered after the commit, so the
-- node it wakes finds the record.
CREATE OR REPLACE FUNCTION {s}.record(p_actor text, p_key text, p_result bytea, p_ttl bigint) RETURNS void LANGUAGE sql AS $$
    INSERT INTO {s}.idempotency (actor, key, result, expires_at) VALUES (p_actor, p_key, p_result, {s}.now_ms() + p_ttl)
    ON CONFLICT (actor, key) DO UPDATE SET result = EXCLUDED.result, expires_at = EXCLUDED.expires_at;
    SELECT pg_notify('loom_done_{s}', p_actor || chr(10) || p_key);
$$;
