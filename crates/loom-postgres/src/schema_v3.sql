-- Version 3: holes a review found outside the crash path (issue 11); rules D5, D7, D8, D11, D12,
-- D13 of RELIABILITY.md. Every statement can run
-- again on a schema that has it (IF EXISTS, IF NOT EXISTS, OR REPLACE).

-- A dead letter goes back to its mailbox as `Envelope::requeued` makes it (a new message id, so
-- that it runs again instead of being taken for a duplicate): the caller passes the new frame,
-- and the message's idempotency key, if it has one, which is held again (as by enqueue_once)
-- until the requeued run records its result. Returns the new position, or 0 if the dead letter
-- is gone.
DROP FUNCTION IF EXISTS {s}.requeue(bigint);
CREATE OR REPLACE FUNCTION {s}.requeue_as(p_id bigint, p_msg text, p_frame bytea, p_key text)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE a text; pos bigint;
BEGIN
    DELETE FROM {s}.dead_letters WHERE id = p_id RETURNING actor INTO a;
    IF NOT FOUND THEN RETURN 0; END IF;
    pos := {s}.mb_enqueue(a, p_msg, p_frame, 0, {s}.now_ms());
    IF p_key IS NOT NULL THEN
        INSERT INTO {s}.idempotency (actor, key, result, expires_at)
            VALUES (a, p_key, NULL, 9223372036854775807)
            ON CONFLICT (actor, key) DO UPDATE SET result = NULL, expires_at = EXCLUDED.expires_at;
    END IF;
    RETURN pos;
END $$;

-- Reserves p_key and enqueues, or reports what holds the key. The reservation is held (expires
-- at bigint max) until its message is settled: the turn that settles it records the result
-- with its ttl from then, so a message that waits longer than the ttl (a delay, a backlog, a
-- parked actor) cannot be sent twice by a client retry. The mailbox row is locked before the
-- key, the order a turn locks them in (its mailboxes, then the key it records), so the two
-- cannot deadlock.
CREATE OR REPLACE FUNCTION {s}.enqueue_once(p_actor text, p_id text, p_frame bytea, p_due bigint, p_key text, p_ttl bigint,
    OUT new boolean, OUT pos bigint, OUT res bytea, OUT expires bigint)
LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
    PERFORM {s}.mb_row(p_actor);
    PERFORM 1 FROM {s}.mailbox WHERE actor = p_actor FOR UPDATE;
    SELECT * INTO r FROM {s}.reserve(p_actor, p_key, p_ttl);
    IF NOT r.reserved THEN new := false; res := r.res; expires := r.expires; RETURN; END IF;
    UPDATE {s}.idempotency SET expires_at = 9223372036854775807 WHERE actor = p_actor AND key = p_key;
    new := true;
    pos := {s}.mb_enqueue(p_actor, p_id, p_frame, p_due, {s}.now_ms());
END $$;

-- A turn, as in version 1, with two changes:
-- - the result of the append that writes the entries is checked: when the actor had no journal
--   at the first check, a plain append racing the turn may have written seq 1 since, and the
--   turn must then be a conflict, not report entries it never wrote;
-- - the idempotency record may belong to the mailbox the turn settles (an event lane: the key
--   of the event the turn consumes), not only to the turn's actor (p_record_actor).
DROP FUNCTION IF EXISTS {s}.turn_many(text[], bigint[], integer[], bytea[], bigint[], integer[], text[], text[], bytea[], bigint[],
    text[], text[], bigint[], integer[], text[], text[], text[], bytea[], bigint[], bigint[], integer[]);
DROP FUNCTION IF EXISTS {s}.turn(text, bigint, bytea[], bigint, text[], text[], bytea[], bigint[],
    text, text, bigint, integer, text, text, text, bytea, bigint, bigint, integer);

CREATE OR REPLACE FUNCTION {s}.turn(
    p_actor text, p_expected bigint, p_frames bytea[],
    p_fence_token bigint,
    p_out_actors text[], p_out_ids text[], p_out_frames bytea[], p_out_due bigint[],
    p_settle text, p_settle_actor text, p_pos bigint, p_dlv integer, p_msg text, p_reason text,
    p_record_actor text, p_record_key text, p_record bytea, p_record_ttl bigint,
    p_next_vis bigint, p_next_max integer,
    OUT status text, OUT highest bigint, OUT nframe bytea, OUT npos bigint, OUT ndlv integer, OUT nerr text)
LANGUAGE plpgsql AS $$
DECLARE now bigint := {s}.now_ms(); r record; boxes text[];
BEGIN
    IF p_fence_token IS NOT NULL THEN
        SELECT * INTO r FROM {s}.leases WHERE actor = p_actor FOR SHARE;
        IF NOT FOUND OR r.token <> p_fence_token OR r.owner IS NULL OR r.expires_at <= now THEN
            status := 'lost'; RETURN;
        END IF;
    END IF;
    -- Lock every mailbox this turn touches in one order, so that turns cannot deadlock.
    boxes := ARRAY(SELECT DISTINCT x FROM unnest(
        array_append(array_append(coalesce(p_out_actors, '{}'), p_actor), coalesce(p_settle_actor, p_actor))) AS x ORDER BY x);
    PERFORM {s}.mb_row(x) FROM unnest(boxes) AS x;
    PERFORM 1 FROM {s}.mailbox WHERE actor = ANY(boxes) ORDER BY actor FOR UPDATE;
    SELECT * INTO r FROM {s}.append(p_actor, p_expected, ARRAY[]::bytea[]);
    IF NOT r.ok THEN status := 'conflict'; highest := r.val; RETURN; END IF;
    IF p_settle IS NOT NULL AND NOT {s}.mb_check(p_settle_actor, p_pos, p_dlv, p_msg) THEN
        status := 'stale'; RETURN;
    END IF;
    -- Nothing is written before this append, so a conflict here still writes nothing.
    SELECT * INTO r FROM {s}.append(p_actor, p_expected, p_frames);
    IF NOT r.ok THEN status := 'conflict'; highest := r.val; RETURN; END IF;
    highest := r.val;
    FOR i IN 1 .. coalesce(array_length(p_out_actors, 1), 0) LOOP
        PERFORM {s}.mb_enqueue(p_out_actors[i], p_out_ids[i], p_out_frames[i], p_out_due[i], now);
    END LOOP;
    IF p_settle = 'ack' THEN
        PERFORM {s}.mb_remove_current(p_settle_actor);
    ELSIF p_settle = 'bury' THEN
        PERFORM {s}.mb_bury(p_settle_actor, p_reason, now);
    END IF;
    IF p_record_key IS NOT NULL THEN
        PERFORM {s}.record(coalesce(p_record_actor, p_actor), p_record_key, p_record, p_record_ttl);
    END IF;
    IF p_next_vis IS NOT NULL THEN
        SELECT * INTO r FROM {s}.mb_lease(p_actor, p_next_vis, p_next_max, now);
        nframe := r.frame; npos := r.pos; ndlv := r.dlv; nerr := r.err;
    END IF;
    status := 'ok';
END $$;

-- Group commit of turns, as in version 1 (see there), with p_record_actor.
CREATE OR REPLACE FUNCTION {s}.turn_many(
    p_actor text[], p_expected bigint[], p_frame_counts integer[], p_frames bytea[],
    p_fence_token bigint[],
    p_out_counts integer[], p_out_actors text[], p_out_ids text[], p_out_frames bytea[], p_out_due bigint[],
    p_settle text[], p_settle_actor text[], p_pos bigint[], p_dlv integer[], p_msg text[], p_reason text[],
    p_record_actor text[], p_record_key text[], p_record bytea[], p_record_ttl bigint[],
    p_next_vis bigint[], p_next_max integer[])
RETURNS TABLE (idx bigint, status text, highest bigint, nframe bytea, npos bigint, ndlv integer, nerr text)
LANGUAGE plpgsql AS $$
DECLARE
    n integer := coalesce(array_length(p_actor, 1), 0);
    fstart integer[]; ostart integer[]; fpos integer := 1; opos integer := 1;
    boxes text[]; r record;
BEGIN
    FOR i IN 1 .. n LOOP
        fstart[i] := fpos; fpos := fpos + p_frame_counts[i];
        ostart[i] := opos; opos := opos + p_out_counts[i];
    END LOOP;
    PERFORM 1 FROM {s}.leases
        WHERE actor = ANY(ARRAY(SELECT p_actor[i] FROM generate_series(1, n) AS i WHERE p_fence_token[i] IS NOT NULL))
        ORDER BY actor FOR SHARE;
    boxes := ARRAY(SELECT DISTINCT x FROM unnest(
        coalesce(p_out_actors, '{}') || p_actor || ARRAY(SELECT x FROM unnest(p_settle_actor) AS x WHERE x IS NOT NULL)) AS x
        ORDER BY x);
    PERFORM {s}.mb_row(x) FROM unnest(boxes) AS x;
    PERFORM 1 FROM {s}.mailbox WHERE actor = ANY(boxes) ORDER BY actor FOR UPDATE;
    PERFORM 1 FROM {s}.journal_meta WHERE actor = ANY(p_actor) ORDER BY actor FOR UPDATE;
    FOR i IN 1 .. n LOOP
        SELECT * INTO r FROM {s}.turn(
            p_actor[i], p_expected[i],
            coalesce(p_frames[fstart[i] : fstart[i] + p_frame_counts[i] - 1], ARRAY[]::bytea[]),
            p_fence_token[i],
            coalesce(p_out_actors[ostart[i] : ostart[i] + p_out_counts[i] - 1], ARRAY[]::text[]),
            coalesce(p_out_ids[ostart[i] : ostart[i] + p_out_counts[i] - 1], ARRAY[]::text[]),
            coalesce(p_out_frames[ostart[i] : ostart[i] + p_out_counts[i] - 1], ARRAY[]::bytea[]),
            coalesce(p_out_due[ostart[i] : ostart[i] + p_out_counts[i] - 1], ARRAY[]::bigint[]),
            p_settle[i], p_settle_actor[i], p_pos[i], p_dlv[i], p_msg[i], p_reason[i],
            p_record_actor[i], p_record_key[i], p_record[i], p_record_ttl[i],
            p_next_vis[i], p_next_max[i]);
        idx := i; status := r.status; highest := r.highest; nframe := r.nframe; npos := r.npos;
        ndlv := r.ndlv; nerr := r.nerr;
        RETURN NEXT;
    END LOOP;
END $$;

-- Journals -----------------------------------------------------------------------------------

-- The highest seq when the journal was last deleted: no snapshot at or below it is accepted, so
-- a compaction finishing after a delete cannot bring the deleted state back.
ALTER TABLE {s}.journal_meta ADD COLUMN IF NOT EXISTS deleted bigint NOT NULL DEFAULT 0;

CREATE OR REPLACE FUNCTION {s}.delete(p_actor text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM {s}.journal_meta WHERE actor = p_actor FOR UPDATE;
    DELETE FROM {s}.journal WHERE actor = p_actor;
    DELETE FROM {s}.snapshots WHERE actor = p_actor;
    UPDATE {s}.journal_meta SET trimmed = highest, deleted = highest WHERE actor = p_actor AND highest > 0;
END $$;

-- Returns (status, value): ('ok', 0), ('ahead', highest), ('behind', trimmed), ('deleted',
-- deleted through).
CREATE OR REPLACE FUNCTION {s}.save_snapshot(p_actor text, p_seq bigint, p_keep integer, p_frame bytea,
    OUT status text, OUT val bigint)
LANGUAGE plpgsql AS $$
DECLARE h bigint; t bigint; d bigint;
BEGIN
    SELECT highest, trimmed, deleted INTO h, t, d FROM {s}.journal_meta WHERE actor = p_actor FOR UPDATE;
    IF NOT FOUND THEN h := 0; t := 0; d := 0; END IF;
    IF p_seq > h THEN status := 'ahead'; val := h; RETURN; END IF;
    IF p_seq < t THEN status := 'behind'; val := t; RETURN; END IF;
    IF p_seq <= d THEN status := 'deleted'; val := d; RETURN; END IF;
    INSERT INTO {s}.snapshots (actor, seq, frame) VALUES (p_actor, p_seq, p_frame)
        ON CONFLICT (actor, seq) DO UPDATE SET frame = EXCLUDED.frame;
    DELETE FROM {s}.snapshots WHERE actor = p_actor AND seq IN (
        SELECT seq FROM {s}.snapshots WHERE actor = p_actor ORDER BY seq DESC OFFSET p_keep);
    status := 'ok'; val := 0;
END $$;

-- Compaction: save_snapshot and the trim through the oldest kept snapshot in one transaction,
-- only while the lease with token p_fence_token is held (NULL: unfenced). Returns
-- ('lost', 0), a refusal as from save_snapshot, or ('ok', the trim point after).
CREATE OR REPLACE FUNCTION {s}.compact(p_actor text, p_seq bigint, p_keep integer, p_frame bytea, p_fence_token bigint,
    OUT status text, OUT val bigint)
LANGUAGE plpgsql AS $$
DECLARE r record; oldest bigint;
BEGIN
    IF p_fence_token IS NOT NULL THEN
        SELECT * INTO r FROM {s}.leases WHERE actor = p_actor FOR SHARE;
        IF NOT FOUND OR r.token <> p_fence_token OR r.owner IS NULL OR r.expires_at <= {s}.now_ms() THEN
            status := 'lost'; val := 0; RETURN;
        END IF;
    END IF;
    SELECT * INTO r FROM {s}.save_snapshot(p_actor, p_seq, p_keep, p_frame);
    IF r.status <> 'ok' THEN status := r.status; val := r.val; RETURN; END IF;
    SELECT min(seq) INTO oldest FROM {s}.snapshots WHERE actor = p_actor;
    PERFORM {s}.trim(p_actor, oldest);
    SELECT trimmed INTO val FROM {s}.journal_meta WHERE actor = p_actor;
    status := 'ok';
END $$;

-- Mailboxes: ready per kind, parked actors ------------------------------------------------------

-- A node looks for ready actors of the kinds it hosts, and only those.
CREATE INDEX IF NOT EXISTS mailbox_kind_ready ON {s}.mailbox (split_part(actor, '/', 1), ready_at)
    WHERE ready_at IS NOT NULL;

-- Parked actors (a park frame each). While an actor is here, its mailbox hands nothing out and
-- its ready_at is NULL.
CREATE TABLE IF NOT EXISTS {s}.parked (
    actor text PRIMARY KEY,
    frame bytea NOT NULL
);

-- Recomputes ready_at (the row is locked by the caller): NULL while parked.
CREATE OR REPLACE FUNCTION {s}.mb_ready(p_actor text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE cur bigint; at bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM {s}.parked WHERE actor = p_actor) THEN
        at := NULL;
    ELSE
        SELECT current INTO cur FROM {s}.mailbox WHERE actor = p_actor;
        IF cur <> 0 THEN
            SELECT visible_at INTO at FROM {s}.messages WHERE actor = p_actor AND position = cur;
        ELSE
            SELECT min(due_at) INTO at FROM {s}.messages WHERE actor = p_actor;
        END IF;
    END IF;
    UPDATE {s}.mailbox SET ready_at = at WHERE actor = p_actor;
END $$;

-- As in version 1, but nothing is handed out while the actor is parked.
CREATE OR REPLACE FUNCTION {s}.mb_lease(p_actor text, p_vis bigint, p_max integer, p_now bigint,
    OUT frame bytea, OUT pos bigint, OUT dlv integer, OUT err text)
LANGUAGE plpgsql AS $$
DECLARE cur bigint; m record;
BEGIN
    SELECT current INTO cur FROM {s}.mailbox WHERE actor = p_actor FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN RETURN; END IF;
    IF EXISTS (SELECT 1 FROM {s}.parked WHERE actor = p_actor) THEN RETURN; END IF;
    LOOP
        IF cur <> 0 THEN
            SELECT * INTO m FROM {s}.messages WHERE actor = p_actor AND position = cur;
            IF m.visible_at > p_now THEN RETURN; END IF;
            IF m.deliveries >= p_max THEN
                PERFORM {s}.mb_bury(p_actor, CASE WHEN m.last_error IS NOT NULL
                    THEN 'gave up after ' || m.deliveries || ' deliveries; last error: ' || m.last_error
                    ELSE 'delivered ' || m.deliveries || ' times and never acked (each lease ran out)' END, p_now);
                cur := 0;
                CONTINUE;
            END IF;
        ELSE
            SELECT * INTO m FROM {s}.messages WHERE actor = p_actor AND due_at <= p_now
                ORDER BY due_at, position LIMIT 1;
            IF NOT FOUND THEN RETURN; END IF;
        END IF;
        UPDATE {s}.messages SET deliveries = deliveries + 1, visible_at = p_now + p_vis
            WHERE actor = p_actor AND position = m.position;
        UPDATE {s}.mailbox SET current = m.position WHERE actor = p_actor;
        PERFORM {s}.mb_ready(p_actor);
        frame := m.frame; pos := m.position; dlv := m.deliveries + 1; err := m.last_error;
        RETURN;
    END LOOP;
END $$;

-- Parks the actor while the lease with token p_fence_token is held (NULL: unfenced): 'ok' or
-- 'lost'. Locks the lease, then the mailbox, as turns do.
CREATE OR REPLACE FUNCTION {s}.park(p_actor text, p_frame bytea, p_fence_token bigint) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
    IF p_fence_token IS NOT NULL THEN
        SELECT * INTO r FROM {s}.leases WHERE actor = p_actor FOR SHARE;
        IF NOT FOUND OR r.token <> p_fence_token OR r.owner IS NULL OR r.expires_at <= {s}.now_ms() THEN
            RETURN 'lost';
        END IF;
    END IF;
    PERFORM {s}.mb_row(p_actor);
    PERFORM 1 FROM {s}.mailbox WHERE actor = p_actor FOR UPDATE;
    INSERT INTO {s}.parked (actor, frame) VALUES (p_actor, p_frame)
        ON CONFLICT (actor) DO UPDATE SET frame = EXCLUDED.frame;
    PERFORM {s}.mb_ready(p_actor);
    RETURN 'ok';
END $$;

-- Unparks the actor: drops its record, makes its current message visible now (its delivery
-- count kept, so that no receipt repeats), lists its mailbox again. Returns the record, NULL if
-- it was not parked.
CREATE OR REPLACE FUNCTION {s}.unpark(p_actor text) RETURNS bytea LANGUAGE plpgsql AS $$
DECLARE f bytea; cur bigint;
BEGIN
    SELECT current INTO cur FROM {s}.mailbox WHERE actor = p_actor FOR UPDATE;
    DELETE FROM {s}.parked WHERE actor = p_actor RETURNING frame INTO f;
    IF NOT FOUND THEN RETURN NULL; END IF;
    IF cur IS NOT NULL AND cur <> 0 THEN
        UPDATE {s}.messages SET visible_at = {s}.now_ms()
            WHERE actor = p_actor AND position = cur;
    END IF;
    IF cur IS NOT NULL THEN
        PERFORM {s}.mb_ready(p_actor);
    END IF;
    RETURN f;
END $$;
