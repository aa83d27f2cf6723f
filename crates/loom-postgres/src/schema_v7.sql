-- Version 7: the hot path does less work per request, with the same behaviour (profiled under
-- the bank with perf and pg_stat_statements; BENCHMARKS.md has the figures). Every statement
-- can run again on a schema that has it.
-- - The functions of the hot path that were LANGUAGE sql become PL/pgSQL. PostgreSQL (before
--   18) parses, analyses and plans the body of a SQL function it cannot inline on every call
--   (`fmgr_sql`), where PL/pgSQL keeps each statement's plan for the session: those calls
--   (mb_row three times per mailbox a turn touches, record, and the lease and enqueue
--   wrappers) took a third of the server's CPU. now_ms stays SQL: it is inlined into callers.
-- - mb_ready is one statement; a lease of a mailbox with nothing ready takes no row lock.
-- - The turns of a batch lock their rows once (turn_locked); append_many is set-based.

-- A mailbox row is never deleted once made, so one that this statement can see needs no
-- insert; and looking does not wait for a transaction that has updated the row and not yet
-- committed (a turn of its batch), where the insert's conflict check would.
CREATE OR REPLACE FUNCTION {s}.mb_row(p_actor text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM {s}.mailbox WHERE actor = p_actor) THEN
        INSERT INTO {s}.mailbox (actor, last_position, current, ready_at, count, last_due)
        VALUES (p_actor, 0, 0, NULL, 0, 0) ON CONFLICT (actor) DO NOTHING;
    END IF;
END $$;

-- Recomputes ready_at (the row is locked by the caller) as version 3's did, in one statement
-- where that took four (every change to a mailbox calls it, four times in a typical turn): NULL
-- while parked, the current message's visible_at while one is out, else the earliest due_at
-- (NULL when empty). The row is written only when the value changes.
CREATE OR REPLACE FUNCTION {s}.mb_ready(p_actor text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE {s}.mailbox AS b SET ready_at = r.at
    FROM (SELECT CASE
            WHEN EXISTS (SELECT 1 FROM {s}.parked AS p WHERE p.actor = p_actor) THEN NULL
            WHEN c.current <> 0 THEN (SELECT m.visible_at FROM {s}.messages AS m
                                      WHERE m.actor = p_actor AND m.position = c.current)
            ELSE (SELECT min(m.due_at) FROM {s}.messages AS m WHERE m.actor = p_actor)
          END AS at
          FROM {s}.mailbox AS c WHERE c.actor = p_actor) AS r
    WHERE b.actor = p_actor AND b.ready_at IS DISTINCT FROM r.at;
END $$;

CREATE OR REPLACE FUNCTION {s}.record(p_actor text, p_key text, p_result bytea, p_ttl bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {s}.idempotency (actor, key, result, expires_at) VALUES (p_actor, p_key, p_result, {s}.now_ms() + p_ttl)
    ON CONFLICT (actor, key) DO UPDATE SET result = EXCLUDED.result, expires_at = EXCLUDED.expires_at;
    PERFORM pg_notify('loom_done_{s}', p_actor || chr(10) || p_key);
END $$;

CREATE OR REPLACE FUNCTION {s}.enqueue(p_actor text, p_id text, p_frame bytea, p_due bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    RETURN {s}.mb_enqueue(p_actor, p_id, p_frame, p_due, {s}.now_ms());
END $$;

-- A lease asked of a mailbox with nothing ready now (its ready_at, kept by every function that
-- changes the mailbox, is NULL or later) is answered by a look, without the row lock mb_lease
-- takes: a row lock is written to the WAL, and its transaction's commit waits for a flush. Most
-- of the ready scan's leases under load are such (a turn took the message first). A mailbox
-- made ready by a transaction not yet committed is not seen here; mb_lease skips it too (its
-- row is locked).
CREATE OR REPLACE FUNCTION {s}.lease(p_actor text, p_vis bigint, p_max integer,
    OUT frame bytea, OUT pos bigint, OUT dlv integer, OUT err text)
LANGUAGE plpgsql AS $$
DECLARE now bigint := {s}.now_ms();
BEGIN
    IF NOT EXISTS (SELECT 1 FROM {s}.mailbox AS b WHERE b.actor = p_actor AND b.ready_at <= now) THEN
        RETURN;
    END IF;
    SELECT m.frame, m.pos, m.dlv, m.err INTO frame, pos, dlv, err
        FROM {s}.mb_lease(p_actor, p_vis, p_max, now) AS m;
END $$;

-- A turn's checks and writes, with its rows already locked: only `turn` and `turn_many` call
-- it, and it is correct only so (its reads take no locks). Locked by `turn` for a turn alone, or by
-- `turn_many` once for its whole batch (before, each turn of a batch locked its rows a second
-- time, and checked its journal's next seq with an empty append before the real one). The
-- lease (if fenced) locked FOR SHARE, every mailbox the turn touches and the journal's meta row
-- (if it has one) FOR UPDATE. A NULL p_fence_token skips the fence check (`turn` made it before
-- locking). Decides exactly as version 3's `turn`: nothing is written before
-- the append, so a refused turn writes nothing.
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
    IF p_fence_token IS NOT NULL THEN
        SELECT * INTO r FROM {s}.leases WHERE actor = p_actor;
        IF NOT FOUND OR r.token <> p_fence_token OR r.owner IS NULL OR r.expires_at <= now THEN
            status := 'lost'; RETURN;
        END IF;
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

-- A turn alone: locks its rows in the order every turn and batch takes them (the lease, the
-- mailboxes by actor, the journal's meta row), so that turns cannot deadlock, then decides.
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
    IF p_fence_token IS NOT NULL THEN
        SELECT * INTO r FROM {s}.leases WHERE actor = p_actor FOR SHARE;
        IF NOT FOUND OR r.token <> p_fence_token OR r.owner IS NULL OR r.expires_at <= {s}.now_ms() THEN
            status := 'lost'; RETURN;
        END IF;
    END IF;
    boxes := ARRAY(SELECT DISTINCT x FROM unnest(
        array_append(array_append(coalesce(p_out_actors, '{}'), p_actor), coalesce(p_settle_actor, p_actor))) AS x ORDER BY x);
    PERFORM {s}.mb_row(x) FROM unnest(boxes) AS x;
    PERFORM 1 FROM {s}.mailbox WHERE actor = ANY(boxes) ORDER BY actor FOR UPDATE;
    PERFORM 1 FROM {s}.journal_meta WHERE actor = p_actor FOR UPDATE;
    -- The fence was checked above, its lease row held FOR SHARE since: not checked again.
    SELECT * INTO r FROM {s}.turn_locked(p_actor, p_expected, p_frames, NULL,
        p_out_actors, p_out_ids, p_out_frames, p_out_due,
        p_settle, p_settle_actor, p_pos, p_dlv, p_msg, p_reason,
        p_record_actor, p_record_key, p_record, p_record_ttl, p_next_vis, p_next_max);
    status := r.status; highest := r.highest; nframe := r.nframe; npos := r.npos;
    ndlv := r.ndlv; nerr := r.nerr;
END $$;

-- Group commit of turns, as in version 3: every row of the batch locked once, then each turn
-- decided by turn_locked.
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

-- Group commit of appends: a batch's journals are decided and written by three statements for
-- the whole batch, where version 1 ran `append` for each (five statements per append). Each
-- append is decided exactly as `append` would decide it alone: ok if its journal's next seq is
-- p_expected, and then (true, new highest), else (false, the next seq); a refused one writes
-- nothing. The meta rows are locked one at a time in actor order, as `append` locks them (a
-- first append makes its row first, so that a racing first append of the same journal waits
-- on the insert and is then refused); the decisions and writes then touch only rows this
-- batch holds. A batch naming one journal twice is decided one append after another.
CREATE OR REPLACE FUNCTION {s}.append_many(p_actors text[], p_expected bigint[], p_counts integer[], p_frames bytea[])
RETURNS TABLE (idx bigint, ok boolean, val bigint) LANGUAGE plpgsql AS $$
DECLARE
    x record; r record; starts integer[]; pos integer := 1;
    n integer := coalesce(array_length(p_actors, 1), 0);
    hs bigint[]; hi bigint;
BEGIN
    FOR i IN 1 .. n LOOP
        starts[i] := pos;
        pos := pos + p_counts[i];
    END LOOP;
    IF (SELECT count(DISTINCT a) FROM unnest(p_actors) AS a) < n THEN
        FOR x IN SELECT u.a, u.i FROM unnest(p_actors) WITH ORDINALITY AS u(a, i) ORDER BY u.a, u.i LOOP
            SELECT * INTO r FROM {s}.append(x.a, p_expected[x.i],
                coalesce(p_frames[starts[x.i] : starts[x.i] + p_counts[x.i] - 1], ARRAY[]::bytea[]));
            idx := x.i; ok := r.ok; val := r.val;
            RETURN NEXT;
        END LOOP;
        RETURN;
    END IF;
    -- Each journal's highest seq, its meta row locked (no row: 0, nothing locked).
    FOR x IN SELECT u.a, u.i FROM unnest(p_actors) WITH ORDINALITY AS u(a, i) ORDER BY u.a LOOP
        SELECT m.highest INTO hi FROM {s}.journal_meta AS m WHERE m.actor = x.a FOR UPDATE;
        IF NOT FOUND THEN
            hi := 0;
            IF p_expected[x.i] = 1 AND p_counts[x.i] > 0 THEN
                INSERT INTO {s}.journal_meta (actor, highest, trimmed) VALUES (x.a, 0, 0)
                    ON CONFLICT (actor) DO NOTHING;
                SELECT m.highest INTO hi FROM {s}.journal_meta AS m WHERE m.actor = x.a FOR UPDATE;
            END IF;
        END IF;
        hs[x.i] := hi;
    END LOOP;
    -- An append wins if its journal's next seq is the one expected; only a winner with frames
    -- writes, and its journal's meta row is locked (it had one, or the loop above made it).
    RETURN QUERY
    WITH req AS (
        SELECT u.a, u.e, u.c, u.i, hs[u.i] AS h
        FROM unnest(p_actors, p_expected, p_counts) WITH ORDINALITY AS u(a, e, c, i)
    ), won AS (
        SELECT * FROM req WHERE req.e = req.h + 1 AND req.c > 0
    ), frames AS (
        INSERT INTO {s}.journal (actor, seq, frame)
        SELECT won.a, won.e + g - 1, p_frames[starts[won.i] + g - 1]
        FROM won CROSS JOIN LATERAL generate_series(1, won.c) AS g
    ), moved AS (
        UPDATE {s}.journal_meta AS m SET highest = won.h + won.c FROM won WHERE m.actor = won.a
    )
    SELECT req.i, req.e = req.h + 1, CASE WHEN req.e = req.h + 1 THEN req.h + req.c ELSE req.h + 1 END
    FROM req;
END $$;
