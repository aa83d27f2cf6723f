-- Version 13: appends decided by the update that writes them. `append_many` (version 7) locked
-- each journal's meta row with `SELECT … FOR UPDATE` (a lock record in the WAL per append) and
-- then updated the winners' rows with one more statement. Now each journal's row is updated
-- only where its highest seq is still the one the append expects (`highest = expected - 1`),
-- the update taking the row's lock, in actor order as before; a first append inserts the row
-- instead. Under READ COMMITTED (which every Loom session pins) an update that finds the row
-- being changed by another transaction waits for it and decides on the row as that transaction
-- left it, so two appends to one journal are decided one after the other, each exactly as
-- `append` alone would decide it.
CREATE OR REPLACE FUNCTION {s}.append_many(p_actors text[], p_expected bigint[], p_counts integer[], p_frames bytea[])
RETURNS TABLE (idx bigint, ok boolean, val bigint) LANGUAGE plpgsql AS $$
DECLARE
    x record; r record; starts integer[]; pos integer := 1;
    won integer[] := ARRAY[]::integer[]; wins boolean[] := ARRAY[]::boolean[];
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
    -- The winners: appends with frames whose journal's meta row moved from expected - 1 to
    -- its new highest, the update taking the row's lock, in actor order (as `append` and
    -- `turn_many` take them, so concurrent batches cannot deadlock); or, for a first append
    -- (expected 1) of a journal without one, whose row the insert made: a racing first append
    -- of another transaction waits on the insert, then does nothing and loses.
    FOR x IN SELECT u.a, u.e, u.c, u.i
             FROM unnest(p_actors, p_expected, p_counts) WITH ORDINALITY AS u(a, e, c, i)
             WHERE u.c > 0 ORDER BY u.a LOOP
        UPDATE {s}.journal_meta AS m SET highest = m.highest + x.c
            WHERE m.actor = x.a AND m.highest = x.e - 1;
        IF NOT FOUND AND x.e = 1 THEN
            INSERT INTO {s}.journal_meta (actor, highest, trimmed) VALUES (x.a, x.c, 0)
                ON CONFLICT (actor) DO NOTHING;
        END IF;
        IF FOUND THEN
            won := won || x.i::integer;
            wins[x.i::integer] := true;
        END IF;
    END LOOP;
    INSERT INTO {s}.journal (actor, seq, frame)
    SELECT p_actors[w], p_expected[w] + g - 1, p_frames[starts[w] + g - 1]
    FROM unnest(won) AS w CROSS JOIN LATERAL generate_series(1, p_counts[w]) AS g;
    RETURN QUERY
    SELECT u.i, true, u.e + u.c - 1
    FROM unnest(p_expected, p_counts) WITH ORDINALITY AS u(e, c, i)
    WHERE wins[u.i::integer];
    -- The others (refused, or asking with no frames whether their next seq is the expected
    -- one): decided on the journals as they are now, after any transaction this batch waited
    -- for, so a refusal names the next seq that made it one.
    RETURN QUERY
    SELECT u.i, u.c = 0 AND u.e = h.h + 1, CASE WHEN u.c = 0 AND u.e = h.h + 1 THEN h.h ELSE h.h + 1 END
    FROM unnest(p_actors, p_expected, p_counts) WITH ORDINALITY AS u(a, e, c, i)
    CROSS JOIN LATERAL (
        SELECT coalesce((SELECT m.highest FROM {s}.journal_meta AS m WHERE m.actor = u.a), 0) AS h
    ) AS h
    WHERE wins[u.i::integer] IS NULL;
END $$;
