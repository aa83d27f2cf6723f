-- Loom's PostgreSQL schema, version 1. `{s}` is the configured schema. Nothing outside it is
-- touched. The layout mirrors the embedded store's tables (see loom-core's embedded/tables.rs),
-- with the same invariants: the journal holds exactly the seqs trimmed+1..highest; highest and
-- trimmed only grow; at most one message per mailbox is current, and while it is, nothing else
-- of that mailbox is handed out; mailbox.ready_at mirrors when the mailbox next has something.
-- Every function checks before it writes, so a refused request writes nothing.

CREATE FUNCTION {s}.now_ms() RETURNS bigint LANGUAGE sql VOLATILE AS
$$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint $$;

CREATE TABLE {s}.journal (
    actor text NOT NULL,
    seq bigint NOT NULL,
    frame bytea NOT NULL,
    PRIMARY KEY (actor, seq)
);

CREATE TABLE {s}.journal_meta (
    actor text PRIMARY KEY,
    highest bigint NOT NULL,
    trimmed bigint NOT NULL
);

CREATE TABLE {s}.snapshots (
    actor text NOT NULL,
    seq bigint NOT NULL,
    frame bytea NOT NULL,
    PRIMARY KEY (actor, seq)
);

-- One row per mailbox. current: the position handed out (or waiting out a nack), 0 if none.
-- ready_at: when it next has something to hand out; NULL when empty. last_due keeps undelayed
-- messages in send order when the clock steps back.
CREATE TABLE {s}.mailbox (
    actor text PRIMARY KEY,
    last_position bigint NOT NULL,
    current bigint NOT NULL,
    ready_at bigint,
    count bigint NOT NULL,
    last_due bigint NOT NULL
);
CREATE INDEX ON {s}.mailbox (ready_at) WHERE ready_at IS NOT NULL;

CREATE TABLE {s}.messages (
    actor text NOT NULL,
    position bigint NOT NULL,
    message_id text NOT NULL,
    frame bytea NOT NULL,
    due_at bigint NOT NULL,
    visible_at bigint NOT NULL,
    deliveries integer NOT NULL,
    last_error text,
    PRIMARY KEY (actor, position)
);
CREATE INDEX ON {s}.messages (actor, due_at, position);

CREATE TABLE {s}.dead_letters (
    id bigserial PRIMARY KEY,
    actor text NOT NULL,
    message_id text NOT NULL,
    envelope bytea NOT NULL,
    reason text NOT NULL,
    deliveries integer NOT NULL,
    at bigint NOT NULL
);

-- Kept after release or expiry (owner NULL), so that tokens only grow.
CREATE TABLE {s}.leases (
    actor text PRIMARY KEY,
    owner text,
    token bigint NOT NULL,
    expires_at bigint NOT NULL
);

-- result NULL: pending.
CREATE TABLE {s}.idempotency (
    actor text NOT NULL,
    key text NOT NULL,
    result bytea,
    expires_at bigint NOT NULL,
    PRIMARY KEY (actor, key)
);
CREATE INDEX ON {s}.idempotency (expires_at);

-- Journal ----------------------------------------------------------------------------------

-- Appends p_frames as seqs p_expected.. if the journal's next seq is p_expected.
-- Returns (true, new highest) or (false, the journal's next seq).
CREATE FUNCTION {s}.append(p_actor text, p_expected bigint, p_frames bytea[], OUT ok boolean, OUT val bigint)
LANGUAGE plpgsql AS $$
DECLARE h bigint; n integer := coalesce(array_length(p_frames, 1), 0);
BEGIN
    SELECT highest INTO h FROM {s}.journal_meta WHERE actor = p_actor FOR UPDATE;
    IF NOT FOUND THEN
        h := 0;
        IF p_expected = 1 AND n > 0 THEN
            -- A first append: make the meta row and lock it, so that a racing first append
            -- waits here and then sees this one (rather than failing on the journal's key,
            -- which would abort every other append in its batch).
            INSERT INTO {s}.journal_meta (actor, highest, trimmed) VALUES (p_actor, 0, 0)
                ON CONFLICT (actor) DO NOTHING;
            SELECT highest INTO h FROM {s}.journal_meta WHERE actor = p_actor FOR UPDATE;
        END IF;
    END IF;
    IF p_expected <> h + 1 THEN ok := false; val := h + 1; RETURN; END IF;
    IF n > 0 THEN
        INSERT INTO {s}.journal (actor, seq, frame)
            SELECT p_actor, p_expected + i - 1, p_frames[i] FROM generate_subscripts(p_frames, 1) AS i;
        INSERT INTO {s}.journal_meta (actor, highest, trimmed) VALUES (p_actor, h + n, 0)
            ON CONFLICT (actor) DO UPDATE SET highest = EXCLUDED.highest;
    END IF;
    ok := true; val := h + n;
END $$;

-- Group commit: many appends in one statement (one transaction, one WAL flush). Each append is
-- decided alone, exactly as `append` would; p_frames holds every append's frames, p_counts how
-- many are each one's. Locks are taken in actor order, so concurrent batches cannot deadlock.
-- Returns (index in the arrays, ok, value as from `append`) per append.
CREATE FUNCTION {s}.append_many(p_actors text[], p_expected bigint[], p_counts integer[], p_frames bytea[])
RETURNS TABLE (idx bigint, ok boolean, val bigint) LANGUAGE plpgsql AS $$
DECLARE x record; r record; starts integer[]; pos integer := 1;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_actors, 1), 0) LOOP
        starts[i] := pos;
        pos := pos + p_counts[i];
    END LOOP;
    FOR x IN SELECT u.a, u.i FROM unnest(p_actors) WITH ORDINALITY AS u(a, i) ORDER BY u.a, u.i LOOP
        SELECT * INTO r FROM {s}.append(x.a, p_expected[x.i],
            coalesce(p_frames[starts[x.i] : starts[x.i] + p_counts[x.i] - 1], ARRAY[]::bytea[]));
        idx := x.i; ok := r.ok; val := r.val;
        RETURN NEXT;
    END LOOP;
END $$;

-- Mailbox ----------------------------------------------------------------------------------

CREATE FUNCTION {s}.mb_row(p_actor text) RETURNS void LANGUAGE sql AS $$
    INSERT INTO {s}.mailbox (actor, last_position, current, ready_at, count, last_due)
    VALUES (p_actor, 0, 0, NULL, 0, 0) ON CONFLICT (actor) DO NOTHING
$$;

-- Recomputes ready_at (the row is locked by the caller).
CREATE FUNCTION {s}.mb_ready(p_actor text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE cur bigint; at bigint;
BEGIN
    SELECT current INTO cur FROM {s}.mailbox WHERE actor = p_actor;
    IF cur <> 0 THEN
        SELECT visible_at INTO at FROM {s}.messages WHERE actor = p_actor AND position = cur;
    ELSE
        SELECT min(due_at) INTO at FROM {s}.messages WHERE actor = p_actor;
    END IF;
    UPDATE {s}.mailbox SET ready_at = at WHERE actor = p_actor;
END $$;

CREATE FUNCTION {s}.mb_enqueue(p_actor text, p_id text, p_frame bytea, p_due bigint, p_now bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE pos bigint; due bigint; ld bigint;
BEGIN
    PERFORM {s}.mb_row(p_actor);
    SELECT last_position + 1, last_due INTO pos, ld FROM {s}.mailbox WHERE actor = p_actor FOR UPDATE;
    IF p_due > p_now THEN
        due := p_due;
    ELSE
        due := greatest(p_now, ld);
        UPDATE {s}.mailbox SET last_due = due WHERE actor = p_actor;
    END IF;
    INSERT INTO {s}.messages (actor, position, message_id, frame, due_at, visible_at, deliveries)
        VALUES (p_actor, pos, p_id, p_frame, due, 0, 0);
    UPDATE {s}.mailbox SET last_position = pos, count = count + 1 WHERE actor = p_actor;
    PERFORM {s}.mb_ready(p_actor);
    RETURN pos;
END $$;

-- True if (pos, dlv, id) is the mailbox's current delivery (the row is locked by the caller).
CREATE FUNCTION {s}.mb_check(p_actor text, p_pos bigint, p_dlv integer, p_id text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE cur bigint; ok boolean;
BEGIN
    SELECT current INTO cur FROM {s}.mailbox WHERE actor = p_actor;
    IF cur IS NULL OR cur = 0 OR cur <> p_pos THEN RETURN false; END IF;
    SELECT deliveries = p_dlv AND message_id = p_id INTO ok FROM {s}.messages WHERE actor = p_actor AND position = p_pos;
    RETURN coalesce(ok, false);
END $$;

CREATE FUNCTION {s}.mb_remove_current(p_actor text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE cur bigint;
BEGIN
    SELECT current INTO cur FROM {s}.mailbox WHERE actor = p_actor;
    DELETE FROM {s}.messages WHERE actor = p_actor AND position = cur;
    UPDATE {s}.mailbox SET current = 0, count = count - 1 WHERE actor = p_actor;
    PERFORM {s}.mb_ready(p_actor);
END $$;

CREATE FUNCTION {s}.mb_bury(p_actor text, p_reason text, p_now bigint) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE cur bigint; f bytea; d integer; mid text; dl bigint;
BEGIN
    SELECT current INTO cur FROM {s}.mailbox WHERE actor = p_actor;
    SELECT frame, deliveries, message_id INTO f, d, mid FROM {s}.messages WHERE actor = p_actor AND position = cur;
    INSERT INTO {s}.dead_letters (actor, message_id, envelope, reason, deliveries, at)
        VALUES (p_actor, mid, f, p_reason, d, p_now) RETURNING id INTO dl;
    PERFORM {s}.mb_remove_current(p_actor);
    RETURN dl;
END $$;

-- Hands out the next due message if any and none is out: (frame, position, deliveries, error).
-- A concurrent lease of the same mailbox (its row locked) finds nothing: SKIP LOCKED.
CREATE FUNCTION {s}.mb_lease(p_actor text, p_vis bigint, p_max integer, p_now bigint,
    OUT frame bytea, OUT pos bigint, OUT dlv integer, OUT err text)
LANGUAGE plpgsql AS $$
DECLARE cur bigint; m record;
BEGIN
    SELECT current INTO cur FROM {s}.mailbox WHERE actor = p_actor FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN RETURN; END IF;
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

CREATE FUNCTION {s}.enqueue(p_actor text, p_id text, p_frame bytea, p_due bigint) RETURNS bigint
LANGUAGE sql AS $$ SELECT {s}.mb_enqueue(p_actor, p_id, p_frame, p_due, {s}.now_ms()) $$;

CREATE FUNCTION {s}.lease(p_actor text, p_vis bigint, p_max integer,
    OUT frame bytea, OUT pos bigint, OUT dlv integer, OUT err text)
LANGUAGE sql AS $$ SELECT * FROM {s}.mb_lease(p_actor, p_vis, p_max, {s}.now_ms()) $$;

-- ack | nack | extend | bury. Returns (ok, dead letter id or 0).
CREATE FUNCTION {s}.settle(p_actor text, p_op text, p_pos bigint, p_dlv integer, p_id text, p_ms bigint, p_text text,
    OUT ok boolean, OUT val bigint)
LANGUAGE plpgsql AS $$
DECLARE now bigint := {s}.now_ms();
BEGIN
    PERFORM 1 FROM {s}.mailbox WHERE actor = p_actor FOR UPDATE;
    IF NOT {s}.mb_check(p_actor, p_pos, p_dlv, p_id) THEN ok := false; val := 0; RETURN; END IF;
    ok := true; val := 0;
    IF p_op = 'ack' THEN
        PERFORM {s}.mb_remove_current(p_actor);
    ELSIF p_op = 'nack' THEN
        UPDATE {s}.messages SET visible_at = now + p_ms, last_error = p_text WHERE actor = p_actor AND position = p_pos;
        PERFORM {s}.mb_ready(p_actor);
    ELSIF p_op = 'extend' THEN
        UPDATE {s}.messages SET visible_at = now + p_ms WHERE actor = p_actor AND position = p_pos;
        PERFORM {s}.mb_ready(p_actor);
    ELSE
        val := {s}.mb_bury(p_actor, p_text, now);
    END IF;
END $$;

CREATE FUNCTION {s}.requeue(p_id bigint) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE d record; pos bigint;
BEGIN
    DELETE FROM {s}.dead_letters WHERE id = p_id RETURNING * INTO d;
    IF NOT FOUND THEN RETURN 0; END IF;
    pos := {s}.mb_enqueue(d.actor, d.message_id, d.envelope, 0, {s}.now_ms());
    RETURN pos;
END $$;

-- Leases -----------------------------------------------------------------------------------

-- Returns (ok, owner, token, expires_at): ok false means held by owner until expires_at.
CREATE FUNCTION {s}.acquire(p_actor text, p_owner text, p_ttl bigint,
    OUT ok boolean, OUT holder text, OUT tok bigint, OUT expires bigint)
LANGUAGE plpgsql AS $$
DECLARE now bigint := {s}.now_ms(); r record;
BEGIN
    INSERT INTO {s}.leases (actor, owner, token, expires_at) VALUES (p_actor, NULL, 0, 0) ON CONFLICT DO NOTHING;
    SELECT * INTO r FROM {s}.leases WHERE actor = p_actor FOR UPDATE;
    IF r.owner IS NOT NULL AND r.expires_at > now THEN
        ok := false; holder := r.owner; tok := r.token; expires := r.expires_at; RETURN;
    END IF;
    UPDATE {s}.leases SET owner = p_owner, token = r.token + 1, expires_at = now + p_ttl WHERE actor = p_actor;
    ok := true; holder := p_owner; tok := r.token + 1; expires := now + p_ttl;
END $$;

-- renew | release; returns the new expiry, or NULL if the lease is not held.
CREATE FUNCTION {s}.lease_cas(p_actor text, p_token bigint, p_op text, p_ttl bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE now bigint := {s}.now_ms(); r record;
BEGIN
    SELECT * INTO r FROM {s}.leases WHERE actor = p_actor FOR UPDATE;
    IF NOT FOUND OR r.token <> p_token OR r.owner IS NULL OR r.expires_at <= now THEN RETURN NULL; END IF;
    IF p_op = 'renew' THEN
        UPDATE {s}.leases SET expires_at = now + p_ttl WHERE actor = p_actor;
        RETURN now + p_ttl;
    END IF;
    UPDATE {s}.leases SET owner = NULL, expires_at = now WHERE actor = p_actor;
    RETURN now;
END $$;

-- Renews every lease still held with its token, locking in actor order (so that concurrent
-- calls cannot deadlock): (index in the arrays, new expiry or NULL if lost) per lease.
CREATE FUNCTION {s}.renew_many(p_actors text[], p_tokens bigint[], p_ttl bigint)
RETURNS TABLE (idx bigint, expires bigint) LANGUAGE plpgsql AS $$
DECLARE x record;
BEGIN
    FOR x IN SELECT u.a, u.t, u.i FROM unnest(p_actors, p_tokens) WITH ORDINALITY AS u(a, t, i)
             ORDER BY u.a, u.i LOOP
        idx := x.i;
        expires := {s}.lease_cas(x.a, x.t, 'renew', p_ttl);
        RETURN NEXT;
    END LOOP;
END $$;

-- Idempotency ------------------------------------------------------------------------------

-- Returns (reserved, result, expires_at): reserved false means the key is taken (result NULL
-- for pending).
CREATE FUNCTION {s}.reserve(p_actor text, p_key text, p_ttl bigint,
    OUT reserved boolean, OUT res bytea, OUT expires bigint)
LANGUAGE plpgsql AS $$
DECLARE now bigint := {s}.now_ms(); r record;
BEGIN
    INSERT INTO {s}.idempotency (actor, key, result, expires_at) VALUES (p_actor, p_key, NULL, now + p_ttl)
        ON CONFLICT (actor, key) DO NOTHING;
    IF FOUND THEN reserved := true; expires := now + p_ttl; RETURN; END IF;
    SELECT * INTO r FROM {s}.idempotency WHERE actor = p_actor AND key = p_key FOR UPDATE;
    IF r.expires_at <= now THEN
        UPDATE {s}.idempotency SET result = NULL, expires_at = now + p_ttl WHERE actor = p_actor AND key = p_key;
        reserved := true; expires := now + p_ttl; RETURN;
    END IF;
    reserved := false; res := r.result; expires := r.expires_at;
END $$;

CREATE FUNCTION {s}.record(p_actor text, p_key text, p_result bytea, p_ttl bigint) RETURNS void LANGUAGE sql AS $$
    INSERT INTO {s}.idempotency (actor, key, result, expires_at) VALUES (p_actor, p_key, p_result, {s}.now_ms() + p_ttl)
    ON CONFLICT (actor, key) DO UPDATE SET result = EXCLUDED.result, expires_at = EXCLUDED.expires_at
$$;

-- Snapshots, trims, deletes -----------------------------------------------------------------

-- Returns (status, value): ('ok', 0), ('ahead', highest), ('behind', trimmed).
CREATE FUNCTION {s}.save_snapshot(p_actor text, p_seq bigint, p_keep integer, p_frame bytea,
    OUT status text, OUT val bigint)
LANGUAGE plpgsql AS $$
DECLARE h bigint; t bigint;
BEGIN
    SELECT highest, trimmed INTO h, t FROM {s}.journal_meta WHERE actor = p_actor FOR UPDATE;
    IF NOT FOUND THEN h := 0; t := 0; END IF;
    IF p_seq > h THEN status := 'ahead'; val := h; RETURN; END IF;
    IF p_seq < t THEN status := 'behind'; val := t; RETURN; END IF;
    INSERT INTO {s}.snapshots (actor, seq, frame) VALUES (p_actor, p_seq, p_frame)
        ON CONFLICT (actor, seq) DO UPDATE SET frame = EXCLUDED.frame;
    DELETE FROM {s}.snapshots WHERE actor = p_actor AND seq IN (
        SELECT seq FROM {s}.snapshots WHERE actor = p_actor ORDER BY seq DESC OFFSET p_keep);
    status := 'ok'; val := 0;
END $$;

-- Returns (ok, oldest kept snapshot or NULL).
CREATE FUNCTION {s}.trim(p_actor text, p_through bigint, OUT ok boolean, OUT oldest bigint)
LANGUAGE plpgsql AS $$
DECLARE t bigint;
BEGIN
    SELECT trimmed INTO t FROM {s}.journal_meta WHERE actor = p_actor FOR UPDATE;
    SELECT min(seq) INTO oldest FROM {s}.snapshots WHERE actor = p_actor;
    IF oldest IS NULL OR p_through > oldest THEN ok := false; RETURN; END IF;
    ok := true;
    IF p_through <= t THEN RETURN; END IF;
    DELETE FROM {s}.journal WHERE actor = p_actor AND seq > t AND seq <= p_through;
    UPDATE {s}.journal_meta SET trimmed = p_through WHERE actor = p_actor;
END $$;

CREATE FUNCTION {s}.delete(p_actor text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM {s}.journal_meta WHERE actor = p_actor FOR UPDATE;
    DELETE FROM {s}.journal WHERE actor = p_actor;
    DELETE FROM {s}.snapshots WHERE actor = p_actor;
    UPDATE {s}.journal_meta SET trimmed = highest WHERE actor = p_actor;
END $$;

-- Returns (ok, next seq).
CREATE FUNCTION {s}.begin_at(p_actor text, p_through bigint, OUT ok boolean, OUT val bigint)
LANGUAGE plpgsql AS $$
DECLARE h bigint;
BEGIN
    SELECT highest INTO h FROM {s}.journal_meta WHERE actor = p_actor FOR UPDATE;
    IF FOUND AND h <> 0 THEN ok := false; val := h + 1; RETURN; END IF;
    IF p_through > 0 THEN
        INSERT INTO {s}.journal_meta (actor, highest, trimmed) VALUES (p_actor, p_through, p_through)
            ON CONFLICT (actor) DO UPDATE SET highest = p_through, trimmed = p_through;
    END IF;
    ok := true; val := p_through + 1;
END $$;

-- Reserves p_key and enqueues, or reports what holds the key:
-- (new, position, result, expires_at); result NULL with new false means pending.
CREATE FUNCTION {s}.enqueue_once(p_actor text, p_id text, p_frame bytea, p_due bigint, p_key text, p_ttl bigint,
    OUT new boolean, OUT pos bigint, OUT res bytea, OUT expires bigint)
LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
    SELECT * INTO r FROM {s}.reserve(p_actor, p_key, p_ttl);
    IF NOT r.reserved THEN new := false; res := r.res; expires := r.expires; RETURN; END IF;
    new := true;
    pos := {s}.mb_enqueue(p_actor, p_id, p_frame, p_due, {s}.now_ms());
END $$;

-- A turn: everything one step of an actor makes durable, all or nothing (one transaction).
-- Returns (status, highest, next frame, next position, next deliveries, next error); status
-- 'ok', 'conflict' (highest holds the next seq), 'lost' (fence), 'stale' (receipt).
CREATE FUNCTION {s}.turn(
    p_actor text, p_expected bigint, p_frames bytea[],
    p_fence_token bigint,
    p_out_actors text[], p_out_ids text[], p_out_frames bytea[], p_out_due bigint[],
    p_settle text, p_settle_actor text, p_pos bigint, p_dlv integer, p_msg text, p_reason text,
    p_record_key text, p_record bytea, p_record_ttl bigint,
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
    SELECT * INTO r FROM {s}.append(p_actor, p_expected, p_frames);
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
        PERFORM {s}.record(p_actor, p_record_key, p_record, p_record_ttl);
    END IF;
    IF p_next_vis IS NOT NULL THEN
        SELECT * INTO r FROM {s}.mb_lease(p_actor, p_next_vis, p_next_max, now);
        nframe := r.frame; npos := r.pos; ndlv := r.dlv; nerr := r.err;
    END IF;
    status := 'ok';
END $$;

-- Group commit of turns: many turns in one statement (one transaction, one WAL flush), each
-- decided alone exactly as `turn` would (a refused turn writes nothing, so it does not affect
-- the others). Per-turn lists are flattened: p_frames and the p_out_* arrays hold every turn's
-- items, p_frame_counts and p_out_counts how many are each one's. Every row the batch will lock
-- is locked first, class by class in the order single turns use (leases, mailboxes, journals)
-- and by actor within a class, so batches and single turns cannot deadlock one another.
-- Returns `turn`'s columns plus the turn's index in the arrays.
CREATE FUNCTION {s}.turn_many(
    p_actor text[], p_expected bigint[], p_frame_counts integer[], p_frames bytea[],
    p_fence_token bigint[],
    p_out_counts integer[], p_out_actors text[], p_out_ids text[], p_out_frames bytea[], p_out_due bigint[],
    p_settle text[], p_settle_actor text[], p_pos bigint[], p_dlv integer[], p_msg text[], p_reason text[],
    p_record_key text[], p_record bytea[], p_record_ttl bigint[],
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
            p_record_key[i], p_record[i], p_record_ttl[i],
            p_next_vis[i], p_next_max[i]);
        idx := i; status := r.status; highest := r.highest; nframe := r.nframe; npos := r.npos;
        ndlv := r.ndlv; nerr := r.nerr;
        RETURN NEXT;
    END LOOP;
END $$;
