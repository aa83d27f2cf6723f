-- Version 5: cancellation (Mailbox::cancel), and sleeps that suspend with a mark (Mailbox::suspend
-- without a lane), so that a cancellation wakes them. Every statement can run again on a schema
-- that has it.

-- True once the message's invocation was asked to be cancelled; goes with the row.
ALTER TABLE {s}.messages ADD COLUMN IF NOT EXISTS cancel boolean NOT NULL DEFAULT false;

-- As in version 4, and: p_lane NULL for a sleep (wake_lane NULL, wake_position set: only a
-- cancellation wakes it); 'cancelled', writing nothing, if the message was asked to be
-- cancelled (checked first).
CREATE OR REPLACE FUNCTION {s}.suspend(p_actor text, p_pos bigint, p_dlv integer, p_id text, p_ms bigint,
    p_text text, p_lane text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE now bigint := {s}.now_ms();
BEGIN
    PERFORM 1 FROM {s}.mailbox WHERE actor = p_actor FOR UPDATE;
    IF NOT {s}.mb_check(p_actor, p_pos, p_dlv, p_id) THEN RETURN 'stale'; END IF;
    IF (SELECT cancel FROM {s}.messages WHERE actor = p_actor AND position = p_pos) THEN RETURN 'cancelled'; END IF;
    IF p_lane IS NOT NULL AND coalesce((SELECT count FROM {s}.mailbox WHERE actor = p_lane), 0) > 0 THEN
        RETURN 'busy';
    END IF;
    UPDATE {s}.messages SET visible_at = now + p_ms, last_error = p_text WHERE actor = p_actor AND position = p_pos;
    UPDATE {s}.mailbox SET wake_lane = p_lane, wake_position = p_pos, wake_deliveries = p_dlv WHERE actor = p_actor;
    PERFORM {s}.mb_ready(p_actor);
    RETURN 'ok';
END $$;

-- Marks message p_id of p_actor's mailbox as asked to be cancelled, and wakes it if it is the
-- suspended current message, not handed out since. Its position, or NULL (nothing written) if
-- it is not in the mailbox. The mailbox row is locked first, as suspend locks it, so a
-- suspension either sees the mark or is woken here.
CREATE OR REPLACE FUNCTION {s}.cancel(p_actor text, p_id text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE p bigint; w record; now bigint;
BEGIN
    PERFORM 1 FROM {s}.mailbox WHERE actor = p_actor FOR UPDATE;
    -- One row (the first, should an id be there twice): UPDATE … INTO refuses several.
    UPDATE {s}.messages SET cancel = true
        WHERE actor = p_actor AND position = (SELECT min(position) FROM {s}.messages
            WHERE actor = p_actor AND message_id = p_id)
        RETURNING position INTO p;
    IF p IS NULL THEN RETURN NULL; END IF;
    SELECT wake_position, wake_deliveries, current INTO w FROM {s}.mailbox WHERE actor = p_actor;
    IF w.wake_position IS NULL OR w.current <> p OR w.wake_position <> p THEN RETURN p; END IF;
    UPDATE {s}.mailbox SET wake_lane = NULL, wake_position = NULL, wake_deliveries = NULL WHERE actor = p_actor;
    now := {s}.now_ms();
    UPDATE {s}.messages SET visible_at = now
        WHERE actor = p_actor AND position = p AND deliveries = w.wake_deliveries AND visible_at > now;
    IF FOUND THEN
        PERFORM {s}.mb_ready(p_actor);
        PERFORM pg_notify('loom_wake_{s}', coalesce(current_setting('loom.origin', true), ''));
    END IF;
    RETURN p;
END $$;

-- Retires an actor (Store::retire; rule D22): with the lease p_token still held, the journal's
-- highest seq still p_highest and no message in the mailbox but the current one (the receipt),
-- acks that message and deletes the journal as delete does. 'ok', or 'lost' | 'stale' |
-- 'moved' | 'busy' with nothing written. Locks in a turn's order: the lease, the mailbox, the
-- journal.
CREATE OR REPLACE FUNCTION {s}.retire(p_actor text, p_highest bigint, p_pos bigint, p_dlv integer,
    p_id text, p_token bigint) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE r record; h bigint;
BEGIN
    SELECT * INTO r FROM {s}.leases WHERE actor = p_actor FOR SHARE;
    IF NOT FOUND OR r.token <> p_token OR r.owner IS NULL OR r.expires_at <= {s}.now_ms() THEN
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
