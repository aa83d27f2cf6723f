-- Version 10: an actor's writes may be fenced by its partition's lease (rule D8): a node that
-- owns a partition runs the partition's actors under that one lease, instead of taking a lease
-- per actor. The fenced functions keep their signatures, so nodes of older builds keep working
-- beside this one: a positive p_fence_token is the actor's own lease's token, as before; a
-- negative one is the negated token of the actor's partition's lease, and such a write is
-- also refused while anyone holds the actor's own lease (so a node of an older build running
-- the actor under its own lease, or a tool holding it, excludes partition-fenced writes). Every
-- statement can run again on a schema that has it.
--
-- Lock modes: every turn of a partition's actors now reads one lease row, the partition's. The
-- fence checks lock it FOR KEY SHARE and renewals and releases FOR NO KEY UPDATE, which do not
-- conflict, so a renewal never waits behind the turns in flight (with FOR SHARE against FOR
-- UPDATE, a steady stream of overlapping turns could hold a renewal off until the lease ran
-- out). `acquire` still locks FOR UPDATE, so a lease changes hands only after every turn that
-- checked it has committed or rolled back.

-- As version 1's: renew | release; returns the new expiry, or NULL if the lease is not held.
-- Locks FOR NO KEY UPDATE (see above).
CREATE OR REPLACE FUNCTION {s}.lease_cas(p_actor text, p_token bigint, p_op text, p_ttl bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE now bigint := {s}.now_ms(); r record;
BEGIN
    SELECT * INTO r FROM {s}.leases WHERE actor = p_actor FOR NO KEY UPDATE;
    IF NOT FOUND OR r.token <> p_token OR r.owner IS NULL OR r.expires_at <= now THEN RETURN NULL; END IF;
    IF p_op = 'renew' THEN
        UPDATE {s}.leases SET expires_at = now + p_ttl WHERE actor = p_actor;
        RETURN now + p_ttl;
    END IF;
    UPDATE {s}.leases SET owner = NULL, expires_at = now WHERE actor = p_actor;
    RETURN now;
END $$;

-- The lease that owns p_actor's partition among the 32 nodes divide (ActorId::partition_lease).
CREATE OR REPLACE FUNCTION {s}.partition_lease(p_actor text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
BEGIN
    RETURN '_partition/' || split_part(p_actor, '/', 1) || '.' || {s}.part_of(p_actor);
END $$;

-- Whether the fence of a write of p_actor is held at p_now (rule D8): with p_token > 0, the
-- actor's own lease has that token and is unexpired; with p_token < 0, its partition's lease
-- has token -p_token and is unexpired, and nobody holds the actor's own lease. The rows read
-- are locked FOR KEY SHARE until the transaction ends, so no `acquire` takes either lease
-- meanwhile. The actor's own row usually does not exist (nodes take no own leases): then
-- nothing is locked, and a tool's `acquire` may make the row and take it while the turn runs.
-- That is still one writer at a time: the tool's writes then wait on the mailbox and journal
-- rows this turn holds, and meet the journal's next seq it wrote.
CREATE OR REPLACE FUNCTION {s}.fence_held(p_actor text, p_token bigint, p_now bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
    IF p_token > 0 THEN
        SELECT * INTO r FROM {s}.leases WHERE actor = p_actor FOR KEY SHARE;
        RETURN FOUND AND r.token = p_token AND r.owner IS NOT NULL AND r.expires_at > p_now;
    END IF;
    SELECT * INTO r FROM {s}.leases WHERE actor = {s}.partition_lease(p_actor) FOR KEY SHARE;
    IF NOT FOUND OR r.token <> -p_token OR r.owner IS NULL OR r.expires_at <= p_now THEN
        RETURN false;
    END IF;
    SELECT * INTO r FROM {s}.leases WHERE actor = p_actor FOR KEY SHARE;
    RETURN NOT FOUND OR r.owner IS NULL OR r.expires_at <= p_now;
END $$;

-- The fenced functions of versions 3, 5 and 7, each checking its fence with fence_held.

CREATE OR REPLACE FUNCTION {s}.turn_locked(
    p_actor text, p_expected bigint, p_frames bytea[],
    p_fence_token bigint,
    p_out_actors text[], p_out_ids text[], p_out_frames bytea[], p_out_due bigint[],
    p_settle text, p_settle_actor text, p_pos bigint, p_dlv integer, p_msg text, p_reason text,
    p_record_actor text, p_record_key text, p_record bytea, p_record_ttl bigint,
    p_next_vis bigint, p_next_max integer,
    OUT status text, OUT highest bigint, OUT nframe bytea, OUT npos bigint, OUT ndlv integer, OUT nerr text)
LANGUAGE plpgsql AS $$
DECLARE now bigint := {s}.now_ms(); r record; h bigint;
BEGIN
    IF p_fence_token IS NOT NULL AND NOT {s}.fence_held(p_actor, p_fence_token, now) THEN
        status := 'lost'; RETURN;
    END IF;
    SELECT m.highest INTO h FROM {s}.journal_meta AS m WHERE m.actor = p_actor;
    IF p_expected <> coalesce(h, 0) + 1 THEN
        status := 'conflict'; highest := coalesce(h, 0) + 1; RETURN;
    END IF;
    IF p_settle IS NOT NULL AND NOT {s}.mb_check(p_settle_actor, p_pos, p_dlv, p_msg) THEN
        status := 'stale'; RETURN;
    END IF;
    -- Nothing is written before this append, so a conflict here (a racing first append took
    -- the journal's first seq) still writes nothing.
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

CREATE OR REPLACE FUNCTION {s}.turn(
    p_actor text, p_expected bigint, p_frames bytea[],
    p_fence_token bigint,
    p_out_actors text[], p_out_ids text[], p_out_frames bytea[], p_out_due bigint[],
    p_settle text, p_settle_actor text, p_pos bigint, p_dlv integer, p_msg text, p_reason text,
    p_record_actor text, p_record_key text, p_record bytea, p_record_ttl bigint,
    p_next_vis bigint, p_next_max integer,
    OUT status text, OUT highest bigint, OUT nframe bytea, OUT npos bigint, OUT ndlv integer, OUT nerr text)
LANGUAGE plpgsql AS $$
DECLARE r record; boxes text[];
BEGIN
    -- A turn of a node that lost its lease is answered before it locks or makes anything.
    IF p_fence_token IS NOT NULL AND NOT {s}.fence_held(p_actor, p_fence_token, {s}.now_ms()) THEN
        status := 'lost'; RETURN;
    END IF;
    boxes := ARRAY(SELECT DISTINCT x FROM unnest(
        array_append(array_append(coalesce(p_out_actors, '{}'), p_actor), coalesce(p_settle_actor, p_actor))) AS x ORDER BY x);
    PERFORM {s}.mb_row(x) FROM unnest(boxes) AS x;
    PERFORM 1 FROM {s}.mailbox WHERE actor = ANY(boxes) ORDER BY actor FOR UPDATE;
    PERFORM 1 FROM {s}.journal_meta WHERE actor = p_actor FOR UPDATE;
    -- The fence was checked above, its lease rows held FOR KEY SHARE since: not checked again.
    SELECT * INTO r FROM {s}.turn_locked(p_actor, p_expected, p_frames, NULL,
        p_out_actors, p_out_ids, p_out_frames, p_out_due,
        p_settle, p_settle_actor, p_pos, p_dlv, p_msg, p_reason,
        p_record_actor, p_record_key, p_record, p_record_ttl, p_next_vis, p_next_max);
    status := r.status; highest := r.highest; nframe := r.nframe; npos := r.npos;
    ndlv := r.ndlv; nerr := r.nerr;
END $$;

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
    -- The fences' lease rows, in one order: each fenced actor's own, and the partitions' of
    -- those fenced by their partition's lease (a negative token; see fence_held).
    PERFORM 1 FROM {s}.leases
        WHERE actor = ANY(ARRAY(
            SELECT p_actor[i] FROM generate_series(1, n) AS i WHERE p_fence_token[i] IS NOT NULL
            UNION ALL
            SELECT {s}.partition_lease(p_actor[i]) FROM generate_series(1, n) AS i WHERE p_fence_token[i] < 0))
        ORDER BY actor FOR KEY SHARE;
    boxes := ARRAY(SELECT DISTINCT x FROM unnest(
        coalesce(p_out_actors, '{}') || p_actor || ARRAY(SELECT x FROM unnest(p_settle_actor) AS x WHERE x IS NOT NULL)) AS x
        ORDER BY x);
    PERFORM {s}.mb_row(x) FROM unnest(boxes) AS x;
    PERFORM 1 FROM {s}.mailbox WHERE actor = ANY(boxes) ORDER BY actor FOR UPDATE;
    PERFORM 1 FROM {s}.journal_meta WHERE actor = ANY(p_actor) ORDER BY actor FOR UPDATE;
    FOR i IN 1 .. n LOOP
        SELECT * INTO r FROM {s}.turn_locked(
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

CREATE OR REPLACE FUNCTION {s}.compact(p_actor text, p_seq bigint, p_keep integer, p_frame bytea, p_fence_token bigint,
    OUT status text, OUT val bigint)
LANGUAGE plpgsql AS $$
DECLARE r record; oldest bigint;
BEGIN
    IF p_fence_token IS NOT NULL AND NOT {s}.fence_held(p_actor, p_fence_token, {s}.now_ms()) THEN
        status := 'lost'; val := 0; RETURN;
    END IF;
    SELECT * INTO r FROM {s}.save_snapshot(p_actor, p_seq, p_keep, p_frame);
    IF r.status <> 'ok' THEN status := r.status; val := r.val; RETURN; END IF;
    SELECT min(seq) INTO oldest FROM {s}.snapshots WHERE actor = p_actor;
    PERFORM {s}.trim(p_actor, oldest);
    SELECT trimmed INTO val FROM {s}.journal_meta WHERE actor = p_actor;
    status := 'ok';
END $$;

CREATE OR REPLACE FUNCTION {s}.park(p_actor text, p_frame bytea, p_fence_token bigint) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    IF p_fence_token IS NOT NULL AND NOT {s}.fence_held(p_actor, p_fence_token, {s}.now_ms()) THEN
        RETURN 'lost';
    END IF;
    PERFORM {s}.mb_row(p_actor);
    PERFORM 1 FROM {s}.mailbox WHERE actor = p_actor FOR UPDATE;
    INSERT INTO {s}.parked (actor, frame) VALUES (p_actor, p_frame)
        ON CONFLICT (actor) DO UPDATE SET frame = EXCLUDED.frame;
    PERFORM {s}.mb_ready(p_actor);
    RETURN 'ok';
END $$;

CREATE OR REPLACE FUNCTION {s}.retire(p_actor text, p_highest bigint, p_pos bigint, p_dlv integer,
    p_id text, p_token bigint) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE h bigint;
BEGIN
    IF NOT {s}.fence_held(p_actor, p_token, {s}.now_ms()) THEN
        RETURN 'lost';
    END IF;
    PERFORM 1 FROM {s}.mailbox WHERE actor = p_actor FOR UPDATE;
    IF NOT {s}.mb_check(p_actor, p_pos, p_dlv, p_id) THEN RETURN 'stale'; END IF;
    SELECT highest INTO h FROM {s}.journal_meta WHERE actor = p_actor FOR UPDATE;
    IF coalesce(h, 0) <> p_highest THEN RETURN 'moved'; END IF;
    IF (SELECT count FROM {s}.mailbox WHERE actor = p_actor) <> 1 THEN RETURN 'busy'; END IF;
    PERFORM {s}.mb_remove_current(p_actor);
    PERFORM {s}.delete(p_actor);
    RETURN 'ok';
END $$;
