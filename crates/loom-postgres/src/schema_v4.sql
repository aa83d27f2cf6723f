-- Version 4: a wait for an event suspends (Mailbox::suspend, Store::enqueue_event; rule D20 of
-- RELIABILITY.md). Every statement can run again on a schema that has it.

-- While the mailbox's current message is suspended on an event lane: the lane, and the position
-- and delivery count it was suspended at. A mark that no longer matches the current delivery is
-- stale and harmless (the message was handed out again, or is gone); the next suspension
-- replaces it.
ALTER TABLE {s}.mailbox ADD COLUMN IF NOT EXISTS wake_lane text;
ALTER TABLE {s}.mailbox ADD COLUMN IF NOT EXISTS wake_position bigint;
ALTER TABLE {s}.mailbox ADD COLUMN IF NOT EXISTS wake_deliveries integer;

-- A nack that an event on p_lane ends early. 'stale' if the receipt is not current; 'busy',
-- writing nothing, if the lane holds a message; else 'ok'. The lane's count is read after the
-- owner's row is locked, and enqueue_event locks that row before it looks for the mark, so an
-- event is either counted here or finds the mark there.
CREATE OR REPLACE FUNCTION {s}.suspend(p_actor text, p_pos bigint, p_dlv integer, p_id text, p_ms bigint,
    p_text text, p_lane text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE now bigint := {s}.now_ms();
BEGIN
    PERFORM 1 FROM {s}.mailbox WHERE actor = p_actor FOR UPDATE;
    IF NOT {s}.mb_check(p_actor, p_pos, p_dlv, p_id) THEN RETURN 'stale'; END IF;
    IF coalesce((SELECT count FROM {s}.mailbox WHERE actor = p_lane), 0) > 0 THEN RETURN 'busy'; END IF;
    UPDATE {s}.messages SET visible_at = now + p_ms, last_error = p_text WHERE actor = p_actor AND position = p_pos;
    UPDATE {s}.mailbox SET wake_lane = p_lane, wake_position = p_pos, wake_deliveries = p_dlv WHERE actor = p_actor;
    PERFORM {s}.mb_ready(p_actor);
    RETURN 'ok';
END $$;

-- enqueue_once of an event on p_lane, and the wake-up of p_owner's message suspended on it.
-- Both mailbox rows are locked first, in actor order as a turn locks them, so the two cannot
-- deadlock.
CREATE OR REPLACE FUNCTION {s}.enqueue_event(p_lane text, p_id text, p_frame bytea, p_key text, p_ttl bigint,
    p_owner text, OUT new boolean, OUT pos bigint, OUT res bytea, OUT expires bigint)
LANGUAGE plpgsql AS $$
DECLARE r record; w record; now bigint;
BEGIN
    PERFORM {s}.mb_row(p_lane);
    PERFORM {s}.mb_row(p_owner);
    PERFORM 1 FROM {s}.mailbox WHERE actor IN (p_lane, p_owner) ORDER BY actor FOR UPDATE;
    SELECT * INTO r FROM {s}.enqueue_once(p_lane, p_id, p_frame, 0, p_key, p_ttl);
    new := r.new; pos := r.pos; res := r.res; expires := r.expires;
    IF NOT new THEN RETURN; END IF;
    SELECT wake_lane, wake_position, wake_deliveries, current INTO w FROM {s}.mailbox WHERE actor = p_owner;
    IF w.wake_lane IS DISTINCT FROM p_lane THEN RETURN; END IF;
    UPDATE {s}.mailbox SET wake_lane = NULL, wake_position = NULL, wake_deliveries = NULL WHERE actor = p_owner;
    IF w.current = 0 OR w.current <> w.wake_position THEN RETURN; END IF;
    now := {s}.now_ms();
    UPDATE {s}.messages SET visible_at = now
        WHERE actor = p_owner AND position = w.current AND deliveries = w.wake_deliveries AND visible_at > now;
    IF FOUND THEN
        PERFORM {s}.mb_ready(p_owner);
        PERFORM pg_notify('loom_wake_{s}', coalesce(current_setting('loom.origin', true), ''));
    END IF;
END $$;
