-- Version 11: a batch of turns is decided and written by a fixed number of set-based statements
-- for the whole batch, instead of some forty PL/pgSQL statements per turn (`turn_locked` once per
-- turn). `turn_many` keeps its signature and its answers, so nodes of older builds keep working
-- beside this one; every statement can run again on a schema that has it.
--
-- What the set-based path does, in order (every row it reads or writes is locked first, in the
-- order every turn and batch takes them: the fences' lease rows, the mailboxes by actor, the
-- journals' meta rows by actor):
--   1. decide each turn on the locked rows, as `turn_locked` decides: 'lost' if its fence is not
--      held, 'conflict' if its journal's next seq is not the one expected, 'stale' if the
--      message it settles is not the current delivery, else 'ok';
--   2. for the winners only: append the journals, delete the acked messages, enqueue the sends
--      (positions after each mailbox's last, in batch order), pick the next message of each
--      winner that asks for one and whose mailbox has none current once settled, update each
--      touched mailbox once (positions, count, current, last_due and ready_at), record the
--      idempotency results;
--   3. any other winner that asks for its next message (a current message to redeliver or
--      bury) gets it from `mb_lease`.
-- A refused turn writes nothing. The turns of a batch are independent (distinct actors, each
-- settling only its own message), so deciding them all before writing any decides each as it
-- would be decided alone; only the next leases see the whole batch's sends, as a lease taken
-- right after the batch would. A batch that is not of that shape (an actor twice, a turn that
-- settles another actor's message or dead-letters one, two turns recording one key) runs turn
-- by turn as in version 10.

-- Signals after commit. A transaction that sends a NOTIFY holds one lock for the whole
-- database from just before its commit until the commit is done, WAL flush included, so every
-- batch that woke anyone (nearly every batch of turns) committed one after another, each
-- waiting for the others' flushes: under the bank, backends spent more time waiting for that
-- lock than for any other. A session that sets `loom.signals` to 'client' (every session of this
-- build's stores, lib.rs) now sends its wake-ups and reply signals itself, after the
-- transaction that warrants them has committed, many in one transaction that does not wait for
-- its flush (`Notifier`, signals.rs); the functions below send nothing for it. For any other
-- session (a node of an older build, psql) they send as before, in the transaction.
CREATE OR REPLACE FUNCTION {s}.signal(p_channel text, p_payload text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('loom.signals', true) IS DISTINCT FROM 'client' THEN
        PERFORM pg_notify(p_channel, p_payload);
    END IF;
END $$;

-- As version 2's, signalling through signal().
CREATE OR REPLACE FUNCTION {s}.mb_enqueue(p_actor text, p_id text, p_frame bytea, p_due bigint, p_now bigint) RETURNS bigint
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
        PERFORM {s}.signal('loom_wake_{s}', coalesce(current_setting('loom.origin', true), ''));
    END IF;
    INSERT INTO {s}.messages (actor, position, message_id, frame, due_at, visible_at, deliveries)
        VALUES (p_actor, pos, p_id, p_frame, due, 0, 0);
    UPDATE {s}.mailbox SET last_position = pos, count = count + 1 WHERE actor = p_actor;
    PERFORM {s}.mb_ready(p_actor);
    RETURN pos;
END $$;

-- As version 7's, signalling through signal().
CREATE OR REPLACE FUNCTION {s}.record(p_actor text, p_key text, p_result bytea, p_ttl bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {s}.idempotency (actor, key, result, expires_at) VALUES (p_actor, p_key, p_result, {s}.now_ms() + p_ttl)
    ON CONFLICT (actor, key) DO UPDATE SET result = EXCLUDED.result, expires_at = EXCLUDED.expires_at;
    PERFORM {s}.signal('loom_done_{s}', p_actor || chr(10) || p_key);
END $$;

-- Makes the mailbox rows of p_actors that do not exist yet, in one statement (mb_row for many).
-- Rows that exist are not inserted, so their conflict check never waits on a batch that holds
-- them.
CREATE OR REPLACE FUNCTION {s}.mb_rows(p_actors text[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {s}.mailbox (actor, last_position, current, ready_at, count, last_due, part)
    SELECT x, 0, 0, NULL, 0, 0, {s}.part_of(x) FROM unnest(p_actors) AS x
    WHERE NOT EXISTS (SELECT 1 FROM {s}.mailbox AS b WHERE b.actor = x)
    ON CONFLICT (actor) DO NOTHING;
END $$;

CREATE OR REPLACE FUNCTION {s}.turn_many(
    p_actor text[], p_expected bigint[], p_frame_counts integer[], p_frames bytea[],
    p_fence_token bigint[],
    p_out_counts integer[], p_out_actors text[], p_out_ids text[], p_out_frames bytea[], p_out_due bigint[],
    p_settle text[], p_settle_actor text[], p_pos bigint[], p_dlv integer[], p_msg text[], p_reason text[],
    p_record_actor text[], p_record_key text[], p_record bytea[], p_record_ttl bigint[],
    p_next_vis bigint[], p_next_max integer[])
RETURNS TABLE (idx bigint, status text, highest bigint, nframe bytea, npos bigint, ndlv integer, nerr text)
LANGUAGE plpgsql
-- Generic plans: PL/pgSQL planned each of these statements anew on every call (a custom plan
-- for the call's arrays), which under the bank at 500 invocations/s made `turn_many` take 1.2
-- ms a call and `lease_many` 0.5; with generic plans 0.9 and 0.2 (BENCHMARKS.md).
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    n integer := coalesce(array_length(p_actor, 1), 0);
    now bigint;
    fstart integer[]; ostart integer[]; fowner integer[]; oowner integer[];
    fpos integer := 1; opos integer := 1;
    boxes text[]; r record; got record; st text[]; hs bigint[]; had boolean[]; fresh text[];
    pk_actor text[] := '{}'; pk_pos bigint[] := '{}'; pk_vis bigint[] := '{}';
    got_frame bytea[]; got_pos bigint[]; got_dlv integer[]; got_err text[];
BEGIN
    FOR i IN 1 .. n LOOP
        fstart[i] := fpos; fpos := fpos + p_frame_counts[i];
        ostart[i] := opos; opos := opos + p_out_counts[i];
    END LOOP;
    -- The turn each frame and each send belongs to.
    fowner := ARRAY(SELECT u.i FROM unnest(p_frame_counts) WITH ORDINALITY AS u(c, i),
        generate_series(1, u.c) ORDER BY u.i);
    oowner := ARRAY(SELECT u.i FROM unnest(p_out_counts) WITH ORDINALITY AS u(c, i),
        generate_series(1, u.c) ORDER BY u.i);
    -- A batch whose every turn is fenced by a lease no longer held (a node that lost its
    -- partitions) is answered before it locks or makes anything, as `turn` answers a turn
    -- alone (`fence_held` reads a lease the same way: a renewal committing just now is not
    -- waited for). Read without locks; answering 'lost' is always safe: the node drops the
    -- partition, and a renewal needs the lease unexpired, a new holder gets a new token.
    IF n > 0 AND NOT EXISTS (
        SELECT 1 FROM unnest(p_actor, p_fence_token) AS u(a, f)
        WHERE u.f IS NULL OR (CASE
            WHEN u.f > 0 THEN EXISTS (SELECT 1 FROM {s}.leases AS l WHERE l.actor = u.a
                AND l.token = u.f AND l.owner IS NOT NULL AND l.expires_at > {s}.now_ms())
            ELSE EXISTS (SELECT 1 FROM {s}.leases AS l WHERE l.actor = {s}.partition_lease(u.a)
                AND l.token = -u.f AND l.owner IS NOT NULL AND l.expires_at > {s}.now_ms())
            END))
    THEN
        RETURN QUERY SELECT g::bigint, 'lost'::text, NULL::bigint, NULL::bytea, NULL::bigint,
            NULL::integer, NULL::text FROM generate_series(1, n) AS g;
        RETURN;
    END IF;
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
    PERFORM {s}.mb_rows(boxes);
    PERFORM 1 FROM {s}.mailbox WHERE actor = ANY(boxes) ORDER BY actor FOR UPDATE;
    PERFORM 1 FROM {s}.journal_meta WHERE actor = ANY(p_actor) ORDER BY actor FOR UPDATE;
    -- The batch's clock, read once its locks are held (turn_locked reads it after them too):
    -- a fence that ran out while the batch waited is not taken as held.
    now := {s}.now_ms();

    -- Not of the shape the set-based path decides: turn by turn, as version 10.
    IF (SELECT count(DISTINCT a) FROM unnest(p_actor) AS a) < n
        OR EXISTS (SELECT 1 FROM unnest(p_actor, p_settle, p_settle_actor) AS u(a, so, sa)
                   WHERE so IS NOT NULL AND (so <> 'ack' OR sa IS DISTINCT FROM a))
        OR (SELECT count(*) - count(DISTINCT (coalesce(ra, a), k))
            FROM unnest(p_actor, p_record_actor, p_record_key) AS u(a, ra, k) WHERE k IS NOT NULL) > 0
    THEN
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
        RETURN;
    END IF;

    -- 1. Decide every turn on the locked rows (fence_held's and mb_check's rules).
    SELECT array_agg(d.st ORDER BY d.i), array_agg(d.h ORDER BY d.i), array_agg(d.had ORDER BY d.i)
        INTO st, hs, had
    FROM (
        SELECT u.i, coalesce(m.highest, 0) AS h, m.actor IS NOT NULL AS had,
            CASE
                WHEN u.f IS NOT NULL AND NOT (CASE
                    WHEN u.f > 0 THEN EXISTS (SELECT 1 FROM {s}.leases AS l WHERE l.actor = u.a
                        AND l.token = u.f AND l.owner IS NOT NULL AND l.expires_at > now)
                    ELSE EXISTS (SELECT 1 FROM {s}.leases AS l WHERE l.actor = {s}.partition_lease(u.a)
                            AND l.token = -u.f AND l.owner IS NOT NULL AND l.expires_at > now)
                        AND NOT EXISTS (SELECT 1 FROM {s}.leases AS l WHERE l.actor = u.a
                            AND l.owner IS NOT NULL AND l.expires_at > now)
                    END) THEN 'lost'
                WHEN u.e <> coalesce(m.highest, 0) + 1 THEN 'conflict'
                WHEN u.so IS NOT NULL AND NOT coalesce(b.current <> 0 AND b.current = u.pos AND EXISTS (
                    SELECT 1 FROM {s}.messages AS x WHERE x.actor = u.a AND x.position = u.pos
                        AND x.deliveries = u.dlv AND x.message_id = u.msg), false) THEN 'stale'
                ELSE 'ok'
            END AS st
        FROM unnest(p_actor, p_expected, p_fence_token, p_settle, p_pos, p_dlv, p_msg)
            WITH ORDINALITY AS u(a, e, f, so, pos, dlv, msg, i)
        LEFT JOIN {s}.journal_meta AS m ON m.actor = u.a
        LEFT JOIN {s}.mailbox AS b ON b.actor = u.a
    ) AS d;

    -- A winner's first append makes its journal's meta row, as `append` makes it: should a
    -- racing first append of the same journal have made it meanwhile (this insert waits for
    -- that transaction and then finds the row), the turn is a conflict after all, at the seq
    -- after what that one wrote. Nothing else was written for it yet.
    WITH made AS (
        INSERT INTO {s}.journal_meta (actor, highest, trimmed)
        SELECT u.a, 0, 0 FROM unnest(p_actor, p_expected, p_frame_counts) WITH ORDINALITY AS u(a, e, c, i)
        WHERE st[u.i] = 'ok' AND u.e = 1 AND u.c > 0 AND NOT had[u.i]
        ON CONFLICT (actor) DO NOTHING RETURNING actor
    ) SELECT coalesce(array_agg(made.actor), '{}') INTO fresh FROM made;
    FOR r IN
        SELECT u.i, u.a FROM unnest(p_actor, p_expected, p_frame_counts) WITH ORDINALITY AS u(a, e, c, i)
        WHERE st[u.i] = 'ok' AND u.e = 1 AND u.c > 0 AND NOT had[u.i] AND u.a <> ALL(fresh)
    LOOP
        st[r.i] := 'conflict';
        hs[r.i] := (SELECT m.highest FROM {s}.journal_meta AS m WHERE m.actor = r.a);
    END LOOP;

    -- 2. The winners' writes. Journals: every frame at its seq, and the new highest.
    INSERT INTO {s}.journal (actor, seq, frame)
    SELECT p_actor[f.t], p_expected[f.t] + (f.k - fstart[f.t]), f.frame
    FROM unnest(p_frames, fowner) WITH ORDINALITY AS f(frame, t, k)
    WHERE st[f.t] = 'ok';
    UPDATE {s}.journal_meta AS m SET highest = hs[u.i] + u.c
    FROM unnest(p_actor, p_frame_counts) WITH ORDINALITY AS u(a, c, i)
    WHERE m.actor = u.a AND st[u.i] = 'ok' AND u.c > 0;

    -- Acked messages leave (each is its mailbox's current delivery, checked above).
    DELETE FROM {s}.messages AS x
    USING unnest(p_actor, p_settle, p_pos) WITH ORDINALITY AS u(a, so, pos, i)
    WHERE st[u.i] = 'ok' AND u.so = 'ack' AND x.actor = u.a AND x.position = u.pos;

    -- Sends: positions after the mailbox's last, in batch order; an undelayed one is due at
    -- the later of now and the mailbox's last due (mb_enqueue's rule, so that undelayed
    -- messages stay in send order when the clock steps back).
    INSERT INTO {s}.messages (actor, position, message_id, frame, due_at, visible_at, deliveries)
    SELECT o.b, mb.last_position + row_number() OVER (PARTITION BY o.b ORDER BY o.k), o.id, o.frame,
        CASE WHEN o.due > now THEN o.due ELSE greatest(now, mb.last_due) END, 0, 0
    FROM unnest(p_out_actors, p_out_ids, p_out_frames, p_out_due, oowner) WITH ORDINALITY AS o(b, id, frame, due, t, k)
    JOIN {s}.mailbox AS mb ON mb.actor = o.b
    WHERE st[o.t] = 'ok';
    IF EXISTS (SELECT 1 FROM unnest(p_out_due, oowner) AS o(due, t) WHERE st[o.t] = 'ok' AND o.due <= now) THEN
        PERFORM {s}.signal('loom_wake_{s}', coalesce(current_setting('loom.origin', true), ''));
    END IF;

    -- Next leases, picked now so that each mailbox is written once. A winner asking for
    -- its next message whose mailbox has no current message once it is settled, and is not
    -- parked, gets its first due message (mb_lease's rule for that case: no delivery limit
    -- checked, as a message that was never current has not been handed out past it).
    got_frame := array_fill(NULL::bytea, ARRAY[n]); got_pos := array_fill(NULL::bigint, ARRAY[n]);
    got_dlv := array_fill(NULL::integer, ARRAY[n]); got_err := array_fill(NULL::text, ARRAY[n]);
    FOR r IN
        SELECT u.i, u.a, u.vis, m.position, m.deliveries, m.frame, m.last_error
        FROM unnest(p_actor, p_next_vis, p_settle) WITH ORDINALITY AS u(a, vis, so, i)
        JOIN {s}.mailbox AS b ON b.actor = u.a
        CROSS JOIN LATERAL (
            SELECT x.position, x.deliveries, x.frame, x.last_error FROM {s}.messages AS x
            WHERE x.actor = u.a AND x.due_at <= now ORDER BY x.due_at, x.position LIMIT 1) AS m
        WHERE st[u.i] = 'ok' AND u.vis IS NOT NULL AND (u.so = 'ack' OR b.current = 0)
          AND NOT EXISTS (SELECT 1 FROM {s}.parked AS p WHERE p.actor = u.a)
        ORDER BY u.i
    LOOP
        got_frame[r.i] := r.frame; got_pos[r.i] := r.position; got_dlv[r.i] := r.deliveries + 1;
        got_err[r.i] := r.last_error;
        pk_actor := pk_actor || r.a; pk_pos := pk_pos || r.position; pk_vis := pk_vis || r.vis;
    END LOOP;
    UPDATE {s}.messages AS x SET deliveries = x.deliveries + 1, visible_at = now + k.vis
    FROM unnest(pk_actor, pk_pos, pk_vis) AS k(a, pos, vis)
    WHERE x.actor = k.a AND x.position = k.pos;

    -- Each touched mailbox once: its positions, count, current, last_due, and ready_at as
    -- mb_ready computes it from the messages now there (a mailbox that just handed out a
    -- message: that message's new visibility).
    UPDATE {s}.mailbox AS b SET
        last_position = b.last_position + c.enq,
        count = b.count + c.enq - c.acks,
        current = CASE WHEN c.pick IS NOT NULL THEN c.pick WHEN c.acks > 0 THEN 0 ELSE b.current END,
        last_due = CASE WHEN c.undelayed THEN greatest(now, b.last_due) ELSE b.last_due END,
        ready_at = CASE
            WHEN EXISTS (SELECT 1 FROM {s}.parked AS p WHERE p.actor = b.actor) THEN NULL
            WHEN c.pick IS NOT NULL THEN now + c.vis
            WHEN c.acks = 0 AND b.current <> 0 THEN (SELECT x.visible_at FROM {s}.messages AS x
                                                     WHERE x.actor = b.actor AND x.position = b.current)
            ELSE (SELECT min(x.due_at) FROM {s}.messages AS x WHERE x.actor = b.actor)
        END
    FROM (
        SELECT w.x, sum(w.enq) AS enq, sum(w.acks) AS acks, bool_or(w.undelayed) AS undelayed,
            max(w.pick) AS pick, max(w.vis) AS vis
        FROM (
            SELECT o.b AS x, 1 AS enq, 0 AS acks, o.due <= now AS undelayed, NULL::bigint AS pick,
                NULL::bigint AS vis
            FROM unnest(p_out_actors, p_out_due, oowner) AS o(b, due, t) WHERE st[o.t] = 'ok'
            UNION ALL
            SELECT u.a, 0, 1, false, NULL, NULL
            FROM unnest(p_actor, p_settle) WITH ORDINALITY AS u(a, so, i) WHERE st[u.i] = 'ok' AND u.so = 'ack'
            UNION ALL
            SELECT k.a, 0, 0, false, k.pos, k.vis FROM unnest(pk_actor, pk_pos, pk_vis) AS k(a, pos, vis)
        ) AS w GROUP BY w.x
    ) AS c
    WHERE b.actor = c.x;

    -- Idempotency results (record's rule), and their reply notifications.
    INSERT INTO {s}.idempotency (actor, key, result, expires_at)
    SELECT coalesce(u.ra, u.a), u.k, u.res, now + u.ttl
    FROM unnest(p_actor, p_record_actor, p_record_key, p_record, p_record_ttl) WITH ORDINALITY AS u(a, ra, k, res, ttl, i)
    WHERE st[u.i] = 'ok' AND u.k IS NOT NULL
    ON CONFLICT (actor, key) DO UPDATE SET result = EXCLUDED.result, expires_at = EXCLUDED.expires_at;
    PERFORM {s}.signal('loom_done_{s}', coalesce(u.ra, u.a) || chr(10) || u.k)
    FROM unnest(p_actor, p_record_actor, p_record_key) WITH ORDINALITY AS u(a, ra, k, i)
    WHERE st[u.i] = 'ok' AND u.k IS NOT NULL;

    -- 3. Any other winner asking for its next message (its current message stays: to
    -- redeliver or bury) asks mb_lease itself.
    FOR r IN
        SELECT u.a, u.vis, u.mx, u.i FROM unnest(p_actor, p_next_vis, p_next_max) WITH ORDINALITY AS u(a, vis, mx, i)
        JOIN {s}.mailbox AS b ON b.actor = u.a
        WHERE st[u.i] = 'ok' AND u.vis IS NOT NULL AND b.current <> 0 AND got_pos[u.i] IS NULL
          AND NOT EXISTS (SELECT 1 FROM {s}.parked AS p WHERE p.actor = u.a)
        ORDER BY u.i
    LOOP
        SELECT m.frame, m.pos, m.dlv, m.err INTO got FROM {s}.mb_lease(r.a, r.vis, r.mx, now) AS m;
        got_frame[r.i] := got.frame; got_pos[r.i] := got.pos; got_dlv[r.i] := got.dlv; got_err[r.i] := got.err;
    END LOOP;

    RETURN QUERY
    SELECT u.i, st[u.i],
        CASE st[u.i] WHEN 'ok' THEN hs[u.i] + u.c WHEN 'conflict' THEN hs[u.i] + 1 END,
        got_frame[u.i], got_pos[u.i], got_dlv[u.i], got_err[u.i]
    FROM unnest(p_frame_counts) WITH ORDINALITY AS u(c, i);
END $$;

-- Group commit of leases (the ready scan's and idle actors' `Mailbox::lease`): one statement
-- and one transaction for a batch, where each lease was a transaction of its own (and, when
-- it handed something out, a WAL flush of its own). Each lease is answered as `lease` alone
-- answers it: a mailbox with nothing ready now (nor within p_early) is answered by a look,
-- without a lock; a ready one is locked, skipping any another transaction holds (as mb_lease
-- skips it); a locked one with no current message and not parked gets its first due message,
-- set-based; any other locked one is leased by `lease` itself (a current message to redeliver
-- or bury, a suspended one to hand out early). A batch naming an actor twice runs `lease` for
-- each in turn. Returns (index, frame, position, deliveries, last error), NULLs for nothing.
CREATE OR REPLACE FUNCTION {s}.lease_many(p_actor text[], p_vis bigint[], p_max integer[], p_early bigint[])
RETURNS TABLE (idx bigint, frame bytea, pos bigint, dlv integer, err text)
LANGUAGE plpgsql
-- Generic plans, as `turn_many`'s.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    n integer := coalesce(array_length(p_actor, 1), 0);
    now bigint := {s}.now_ms();
    r record; got record; locked text[];
    got_frame bytea[]; got_pos bigint[]; got_dlv integer[]; got_err text[];
BEGIN
    IF (SELECT count(DISTINCT a) FROM unnest(p_actor) AS a) < n THEN
        FOR i IN 1 .. n LOOP
            SELECT * INTO got FROM {s}.lease(p_actor[i], p_vis[i], p_max[i], p_early[i]);
            idx := i; frame := got.frame; pos := got.pos; dlv := got.dlv; err := got.err;
            RETURN NEXT;
        END LOOP;
        RETURN;
    END IF;
    locked := ARRAY(
        SELECT b.actor FROM {s}.mailbox AS b
        JOIN unnest(p_actor, p_early) AS u(a, early) ON b.actor = u.a
        WHERE b.ready_at <= now + greatest(u.early, 0)
        ORDER BY b.actor FOR UPDATE OF b SKIP LOCKED);
    got_frame := array_fill(NULL::bytea, ARRAY[n]); got_pos := array_fill(NULL::bigint, ARRAY[n]);
    got_dlv := array_fill(NULL::integer, ARRAY[n]); got_err := array_fill(NULL::text, ARRAY[n]);
    IF coalesce(array_length(locked, 1), 0) = 0 THEN
        RETURN QUERY SELECT g::bigint, NULL::bytea, NULL::bigint, NULL::integer, NULL::text
            FROM generate_series(1, n) AS g;
        RETURN;
    END IF;
    FOR r IN
        WITH want AS (
            SELECT u.a, u.vis, u.i FROM unnest(p_actor, p_vis) WITH ORDINALITY AS u(a, vis, i)
            JOIN {s}.mailbox AS b ON b.actor = u.a
            WHERE u.a = ANY(locked) AND b.current = 0 AND b.ready_at <= now
              AND NOT EXISTS (SELECT 1 FROM {s}.parked AS p WHERE p.actor = u.a)
        ), picked AS (
            SELECT w.a, w.vis, w.i, m.position, m.deliveries, m.frame, m.last_error
            FROM want AS w CROSS JOIN LATERAL (
                SELECT x.position, x.deliveries, x.frame, x.last_error FROM {s}.messages AS x
                WHERE x.actor = w.a AND x.due_at <= now ORDER BY x.due_at, x.position LIMIT 1) AS m
        ), handed AS (
            UPDATE {s}.messages AS x SET deliveries = x.deliveries + 1, visible_at = now + p.vis
            FROM picked AS p WHERE x.actor = p.a AND x.position = p.position
        ), marked AS (
            UPDATE {s}.mailbox AS b SET current = p.position, ready_at = now + p.vis
            FROM picked AS p WHERE b.actor = p.a
        )
        SELECT p.i, p.frame, p.position, p.deliveries + 1 AS dlv, p.last_error FROM picked AS p
    LOOP
        got_frame[r.i] := r.frame; got_pos[r.i] := r.position; got_dlv[r.i] := r.dlv; got_err[r.i] := r.last_error;
    END LOOP;
    FOR r IN
        SELECT u.a, u.vis, u.mx, u.early, u.i
        FROM unnest(p_actor, p_vis, p_max, p_early) WITH ORDINALITY AS u(a, vis, mx, early, i)
        WHERE u.a = ANY(locked) AND got_pos[u.i] IS NULL
        ORDER BY u.i
    LOOP
        SELECT * INTO got FROM {s}.lease(r.a, r.vis, r.mx, r.early);
        got_frame[r.i] := got.frame; got_pos[r.i] := got.pos; got_dlv[r.i] := got.dlv; got_err[r.i] := got.err;
    END LOOP;
    RETURN QUERY SELECT g::bigint, got_frame[g], got_pos[g], got_dlv[g], got_err[g]
        FROM generate_series(1, n) AS g;
END $$;
