-- Version 13: appends decided by the update that writes them. `append_many` (version 7) locked
-- each journal's meta row with `SELECT … FOR UPDATE` (a lock record in the WAL per append) and
-- then updated the winners' rows with one more statement. Now an append whose journal's highest
-- seq is the one it expects wins by one conditional update (`highest = expected - 1`), which
-- takes the row's lock; any other is decided as `append` decides it, on the row locked. Rows
-- are still taken in actor order, so concurrent batches cannot deadlock.
CREATE OR REPLACE FUNCTION {s}.append_many(p_actors text[], p_expected bigint[], p_counts integer[], p_frames bytea[])
RETURNS TABLE (idx bigint, ok boolean, val bigint) LANGUAGE plpgsql AS $$
DECLARE
    x record; r record; starts integer[]; pos integer := 1; hi bigint;
    won integer[] := ARRAY[]::integer[]; oks boolean[] := ARRAY[]::boolean[];
    vals bigint[] := ARRAY[]::bigint[];
    n integer := coalesce(array_length(p_actors, 1), 0);
BEGIN
    FOR i IN 1 .. n LOOP
        starts[i] := pos;
        pos := pos + p_counts[i];
    END LOOP;
    -- A batch naming one journal twice is decided one append after another (an update may
    -- not change a row twice in one statement).
    IF (SELECT count(DISTINCT a) FROM unnest(p_actors) AS a) < n THEN
        FOR x IN SELECT u.a, u.i FROM unnest(p_actors) WITH ORDINALITY AS u(a, i) ORDER BY u.a, u.i LOOP
            SELECT * INTO r FROM {s}.append(x.a, p_expected[x.i],
                coalesce(p_frames[starts[x.i] : starts[x.i] + p_counts[x.i] - 1], ARRAY[]::bytea[]));
            idx := x.i; ok := r.ok; val := r.val;
            RETURN NEXT;
        END LOOP;
        RETURN;
    END IF;
    -- Each append with frames, in actor order (as `append` and `turn_many` lock rows, so
    -- concurrent batches cannot deadlock). The common case is one statement: the update of a
    -- journal whose highest seq is the one the append expects, which takes the row's lock and
    -- wins. Otherwise the append is decided exactly as `append` decides it: the row locked
    -- (waiting for a transaction that holds it, which the update does not do when the row it
    -- sees does not match yet), made if it is missing and the append is a first one (a racing
    -- first append of another transaction waits on the insert, then finds this one's row), and
    -- its highest compared again.
    FOR x IN SELECT u.a, u.e, u.c, u.i
             FROM unnest(p_actors, p_expected, p_counts) WITH ORDINALITY AS u(a, e, c, i)
             WHERE u.c > 0 ORDER BY u.a LOOP
        UPDATE {s}.journal_meta AS m SET highest = m.highest + x.c
            WHERE m.actor = x.a AND m.highest = x.e - 1;
        IF NOT FOUND THEN
            SELECT m.highest INTO hi FROM {s}.journal_meta AS m WHERE m.actor = x.a FOR UPDATE;
            IF NOT FOUND THEN
                hi := 0;
                IF x.e = 1 THEN
                    INSERT INTO {s}.journal_meta (actor, highest, trimmed) VALUES (x.a, 0, 0)
                        ON CONFLICT (actor) DO NOTHING;
                    SELECT m.highest INTO hi FROM {s}.journal_meta AS m WHERE m.actor = x.a FOR UPDATE;
                END IF;
            END IF;
            IF hi <> x.e - 1 THEN
                oks[x.i::integer] := false;
                vals[x.i::integer] := hi + 1;
                CONTINUE;
            END IF;
            UPDATE {s}.journal_meta AS m SET highest = hi + x.c WHERE m.actor = x.a;
        END IF;
        won := won || x.i::integer;
        oks[x.i::integer] := true;
        vals[x.i::integer] := x.e + x.c - 1;
    END LOOP;
    INSERT INTO {s}.journal (actor, seq, frame)
    SELECT p_actors[w], p_expected[w] + g - 1, p_frames[starts[w] + g - 1]
    FROM unnest(won) AS w CROSS JOIN LATERAL generate_series(1, p_counts[w]) AS g;
    -- Appends with frames: won (the new highest) or refused (the journal's next seq).
    RETURN QUERY
    SELECT u.i, oks[u.i::integer], vals[u.i::integer]
    FROM unnest(p_counts) WITH ORDINALITY AS u(c, i)
    WHERE u.c > 0;
    -- Appends without frames ask whether their journal's next seq is the expected one: one
    -- read of the journals as they are now, without locks, as a snapshot answers it.
    RETURN QUERY
    SELECT u.i, u.e = h.h + 1, CASE WHEN u.e = h.h + 1 THEN h.h ELSE h.h + 1 END
    FROM unnest(p_actors, p_expected, p_counts) WITH ORDINALITY AS u(a, e, c, i)
    CROSS JOIN LATERAL (
        SELECT coalesce((SELECT m.highest FROM {s}.journal_meta AS m WHERE m.actor = u.a), 0) AS h
    ) AS h
    WHERE u.c = 0;
END $$;
