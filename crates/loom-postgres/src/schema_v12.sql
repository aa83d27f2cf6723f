-- Version 12: partitioned storage (rule D18; DESIGN.md, "How a message travels"). A store
-- created with 32 partitions (`PostgresOptions::partitions`, `?partitions=32`) cuts its actors
-- into the same 32 partitions nodes own (`part_of`, ownership and the ready index use them
-- already); a turn then writes and locks only its own partition's rows: a message it sends to an
-- actor of another partition is a row of the `outbox` table instead of a lock on that actor's
-- mailbox row, and a relay in every connected store moves it (`relay` below, `relay.rs`). A
-- store of 1 partition (every store made before this version, and the default) works as before.

-- The store's partition count, fixed when it is created (lib.rs records it, in the migrating
-- transaction: 1 or 32).
CREATE TABLE IF NOT EXISTS {s}.partitions (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    n integer NOT NULL CHECK (n IN (1, 32))
);

-- Messages turns sent to actors of other partitions, not yet moved. `part` is the sending
-- turn's partition, `seq` from one sequence for the whole store: a sender's later turn always
-- draws a greater seq than its earlier ones (it starts after they committed), so moving each
-- partition's rows in seq order keeps every (sender, receiver) pair in send order. The seqs are
-- not gapless (a turn that rolls back loses its draws) and need not be: a move deletes the
-- rows it enqueues in the same transaction, so no high-water mark has to remember what was
-- moved (Redis needs them, its move and trim being two steps).
-- Invariant: part_of(actor) <> part (a message to an actor of the same partition is enqueued
-- by its turn), checked by `loom journal verify`.
-- CACHE 1 (the default, said here because order rests on it): with a cache per session, a
-- sender's later turn, on another pooled connection, could draw a smaller seq.
CREATE SEQUENCE IF NOT EXISTS {s}.outbox_seq CACHE 1;
CREATE TABLE IF NOT EXISTS {s}.outbox (
    part integer NOT NULL,
    seq bigint NOT NULL,
    actor text NOT NULL,
    message_id text NOT NULL,
    frame bytea NOT NULL,
    due bigint NOT NULL,
    PRIMARY KEY (part, seq)
);

-- A batch of turns (as `turn_many` takes them, with only the sends to actors of their own
-- partitions in p_out_*) whose winners also put their sends to other partitions in the outbox,
-- in the same transaction: p_ob_owner[k] is the turn (1-based) that sent message k, p_ob_part[k]
-- that turn's partition. A refused turn's messages are not written. A turn alone runs `turn`,
-- as group.rs runs it for a lone turn without outbox messages (cheaper for one than
-- `turn_many`'s set-based statements).
CREATE OR REPLACE FUNCTION {s}.turn_relayed(
    p_actor text[], p_expected bigint[], p_frame_counts integer[], p_frames bytea[],
    p_fence_token bigint[],
    p_out_counts integer[], p_out_actors text[], p_out_ids text[], p_out_frames bytea[], p_out_due bigint[],
    p_settle text[], p_settle_actor text[], p_pos bigint[], p_dlv integer[], p_msg text[], p_reason text[],
    p_record_actor text[], p_record_key text[], p_record bytea[], p_record_ttl bigint[],
    p_next_vis bigint[], p_next_max integer[],
    p_ob_owner integer[], p_ob_part integer[], p_ob_actor text[], p_ob_id text[], p_ob_frame bytea[],
    p_ob_due bigint[])
RETURNS TABLE (idx bigint, status text, highest bigint, nframe bytea, npos bigint, ndlv integer, nerr text)
LANGUAGE plpgsql AS $$
DECLARE st text[] := '{}'; r record;
BEGIN
    IF coalesce(array_length(p_actor, 1), 0) = 1 THEN
        SELECT * INTO r FROM {s}.turn(p_actor[1], p_expected[1], coalesce(p_frames, '{}'),
            p_fence_token[1], coalesce(p_out_actors, '{}'), coalesce(p_out_ids, '{}'),
            coalesce(p_out_frames, '{}'), coalesce(p_out_due, '{}'),
            p_settle[1], p_settle_actor[1], p_pos[1], p_dlv[1], p_msg[1], p_reason[1],
            p_record_actor[1], p_record_key[1], p_record[1], p_record_ttl[1],
            p_next_vis[1], p_next_max[1]);
        st[1] := r.status;
        idx := 1; status := r.status; highest := r.highest; nframe := r.nframe; npos := r.npos;
        ndlv := r.ndlv; nerr := r.nerr;
        RETURN NEXT;
    ELSE
        FOR r IN SELECT * FROM {s}.turn_many(p_actor, p_expected, p_frame_counts, p_frames,
            p_fence_token, p_out_counts, p_out_actors, p_out_ids, p_out_frames, p_out_due,
            p_settle, p_settle_actor, p_pos, p_dlv, p_msg, p_reason,
            p_record_actor, p_record_key, p_record, p_record_ttl, p_next_vis, p_next_max)
        LOOP
            st[r.idx] := r.status;
            idx := r.idx; status := r.status; highest := r.highest; nframe := r.nframe;
            npos := r.npos; ndlv := r.ndlv; nerr := r.nerr;
            RETURN NEXT;
        END LOOP;
    END IF;
    -- In the order sent: the seqs are drawn as the ordered rows are read.
    INSERT INTO {s}.outbox (part, seq, actor, message_id, frame, due)
    SELECT o.part, nextval('{s}.outbox_seq'), o.a, o.id, o.frame, o.due
    FROM (SELECT u.part, u.a, u.id, u.frame, u.due
          FROM unnest(p_ob_owner, p_ob_part, p_ob_actor, p_ob_id, p_ob_frame, p_ob_due)
              WITH ORDINALITY AS u(t, part, a, id, frame, due, k)
          WHERE st[u.t] = 'ok' ORDER BY u.k) AS o;
END $$;

-- The relay's move (relay.rs): up to p_limit messages of each of p_parts' outboxes, from the
-- bottom, go into their recipients' mailboxes (`mb_enqueue`, as a turn's send would: ids,
-- delays and frames as sent) and leave the outbox, in one transaction, so a message is moved
-- exactly once however many relays run. A partition is moved only under a transaction-scoped
-- advisory lock on it, so that two relays never move one outbox at once (the later move could
-- commit first and put a sender's later message ahead of an earlier one); a partition whose
-- lock another relay holds is skipped and answered as busy (actor NULL), for the caller to
-- look again shortly. The lock is released after the commit is visible, so the next holder's
-- statements see what this one deleted (they run in READ COMMITTED, which every session of
-- the store sets, lib.rs). The recipients' mailbox rows of every partition moved are locked in
-- one statement, in actor order, as turns lock them (locking them partition by partition put
-- the relay's locks in another order than the turns', and their waits on each other cut the
-- bank's peak to under a third), waiting at most a second (`lock_timeout`: under the bank at
-- full load turns' batches hold them for tens of milliseconds). Should some row be held
-- longer, each partition is tried on its own instead, waiting at most 50 ms (less than the
-- deadlock detector's second, so a relay and a batch of turns that now lock in opposite orders
-- cannot deadlock: the relay gives up), and a partition whose rows stay held is answered as
-- blocked (actor NULL, moved -1) and left for the next sweep while the others move. Returns,
-- per partition and recipient, how many messages moved and whether one is due now.
--
-- Its commit does not wait for its WAL flush (`synchronous_commit` off for this transaction
-- only): a move is acknowledged to nobody, and a crash that loses it loses the whole
-- transaction, delete and enqueue alike, so the rows are back in the outbox and are moved
-- again. Whatever depends on a move is a later commit that does wait (a turn settling the
-- message, a lease handing it out): WAL is flushed in order, so that flush makes the move
-- durable first. The relay's hop then costs no flush of its own. Only readers that write
-- nothing (`loom mailbox`, `pending`, the ready scan: a spurious wake-up) can see a move a
-- crash then undoes; a message enqueued straight into that mailbox after the restart, before
-- the move is made again, then comes before it (order per sender and receiver is kept: it is
-- another sender's).
CREATE OR REPLACE FUNCTION {s}.relay(p_parts integer[], p_limit integer)
RETURNS TABLE (part integer, actor text, moved integer, due_now boolean)
LANGUAGE plpgsql AS $$
DECLARE
    now bigint; p integer; held boolean;
    t_part integer[] := '{}'; t_seq bigint[] := '{}'; t_actor text[] := '{}';
    go integer[] := '{}';
    m_part integer[] := '{}'; m_actor text[] := '{}'; m_id text[] := '{}'; m_frame bytea[] := '{}';
    m_due bigint[] := '{}';
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    -- 1. The partitions to move (their advisory locks) and the rows to move of each.
    FOR p IN SELECT DISTINCT x FROM unnest(p_parts) AS x ORDER BY x LOOP
        IF NOT pg_try_advisory_xact_lock(hashtext('loom relay {s}'), p) THEN
            part := p; actor := NULL; moved := 0; due_now := false;
            RETURN NEXT;
            CONTINUE;
        END IF;
        SELECT t_part || coalesce(array_agg(p ORDER BY b.seq), '{}'),
            t_seq || coalesce(array_agg(b.seq ORDER BY b.seq), '{}'),
            t_actor || coalesce(array_agg(b.actor ORDER BY b.seq), '{}')
        INTO t_part, t_seq, t_actor
        FROM (SELECT o.seq, o.actor FROM {s}.outbox AS o WHERE o.part = p
              ORDER BY o.seq LIMIT p_limit) AS b;
    END LOOP;
    IF coalesce(array_length(t_seq, 1), 0) = 0 THEN
        RETURN;
    END IF;
    -- 2. Their recipients' mailbox rows: all at once in actor order, else partition by partition.
    held := false;
    BEGIN
        PERFORM set_config('lock_timeout', '1s', true);
        PERFORM {s}.mb_rows(ARRAY(SELECT DISTINCT x FROM unnest(t_actor) AS x ORDER BY x));
        PERFORM 1 FROM {s}.mailbox AS mb WHERE mb.actor = ANY(t_actor) ORDER BY mb.actor
            FOR UPDATE;
    EXCEPTION WHEN lock_not_available THEN
        held := true;
    END;
    IF NOT held THEN
        go := ARRAY(SELECT DISTINCT x FROM unnest(t_part) AS x);
    ELSE
        PERFORM set_config('lock_timeout', '50ms', true);
        FOR p IN SELECT DISTINCT x FROM unnest(t_part) AS x ORDER BY x LOOP
            held := false;
            BEGIN
                PERFORM {s}.mb_rows(ARRAY(SELECT DISTINCT u.a FROM unnest(t_part, t_actor) AS u(q, a)
                    WHERE u.q = p ORDER BY u.a));
                PERFORM 1 FROM {s}.mailbox AS mb
                    WHERE mb.actor = ANY(ARRAY(SELECT u.a FROM unnest(t_part, t_actor) AS u(q, a)
                        WHERE u.q = p))
                    ORDER BY mb.actor FOR UPDATE;
            EXCEPTION WHEN lock_not_available THEN
                held := true;
            END;
            IF held THEN
                part := p; actor := NULL; moved := -1; due_now := false;
                RETURN NEXT;
            ELSE
                go := go || p;
            END IF;
        END LOOP;
    END IF;
    -- 3. The rows of the partitions whose recipients are locked leave the outbox.
    WITH gone AS (
        DELETE FROM {s}.outbox AS o
        USING unnest(t_part, t_seq) AS u(q, sq)
        WHERE u.q = ANY(go) AND o.part = u.q AND o.seq = u.sq
        RETURNING o.part, o.seq, o.actor, o.message_id, o.frame, o.due)
    SELECT coalesce(array_agg(g.part ORDER BY g.part, g.seq), '{}'),
        coalesce(array_agg(g.actor ORDER BY g.part, g.seq), '{}'),
        coalesce(array_agg(g.message_id ORDER BY g.part, g.seq), '{}'),
        coalesce(array_agg(g.frame ORDER BY g.part, g.seq), '{}'),
        coalesce(array_agg(g.due ORDER BY g.part, g.seq), '{}')
    INTO m_part, m_actor, m_id, m_frame, m_due
    FROM gone AS g;
    IF coalesce(array_length(m_actor, 1), 0) = 0 THEN
        RETURN;
    END IF;
    now := {s}.now_ms();
    -- Every message as `mb_enqueue` would enqueue them one by one, in seq order, with one
    -- statement per table (the rows are locked): positions after each mailbox's last; an
    -- undelayed one due at the later of now and the mailbox's last due (so undelayed messages
    -- stay in send order when the clock steps back); each mailbox's count, last position, last
    -- due and ready_at (`mb_ready`'s rule) written once.
    INSERT INTO {s}.messages (actor, position, message_id, frame, due_at, visible_at, deliveries)
    SELECT o.a, mb.last_position + row_number() OVER (PARTITION BY o.a ORDER BY o.k), o.id,
        o.frame, CASE WHEN o.due > now THEN o.due ELSE greatest(now, mb.last_due) END, 0, 0
    FROM unnest(m_actor, m_id, m_frame, m_due) WITH ORDINALITY AS o(a, id, frame, due, k)
    JOIN {s}.mailbox AS mb ON mb.actor = o.a;
    UPDATE {s}.mailbox AS b SET
        last_position = b.last_position + c.enq,
        count = b.count + c.enq,
        last_due = CASE WHEN c.undelayed THEN greatest(now, b.last_due) ELSE b.last_due END,
        ready_at = CASE
            WHEN EXISTS (SELECT 1 FROM {s}.parked AS pk WHERE pk.actor = b.actor) THEN NULL
            WHEN b.current <> 0 THEN (SELECT x.visible_at FROM {s}.messages AS x
                                      WHERE x.actor = b.actor AND x.position = b.current)
            ELSE (SELECT min(x.due_at) FROM {s}.messages AS x WHERE x.actor = b.actor)
        END
    FROM (SELECT o.a AS x, count(*) AS enq, bool_or(o.due <= now) AS undelayed
          FROM unnest(m_actor, m_due) AS o(a, due) GROUP BY o.a) AS c
    WHERE b.actor = c.x;
    RETURN QUERY SELECT u.p, u.a, count(*)::integer, bool_or(u.d <= now)
        FROM unnest(m_part, m_actor, m_due) AS u(p, a, d) GROUP BY u.p, u.a;
END $$;
