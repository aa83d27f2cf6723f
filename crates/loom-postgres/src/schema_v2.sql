-- Version 2: wake idle dispatchers of other processes when a message due now is enqueued.
--
-- mb_enqueue (every enqueue goes through it: plain sends, enqueue_once, a turn's outbox, a
-- requeued dead letter) also NOTIFYs the schema's channel. PostgreSQL delivers the notification
-- after the commit, and folds identical ones of one transaction into one, so a batch of turns
-- costs one. The payload names the sending store (the `loom.origin` setting of its sessions),
-- whose own runtime has woken itself and skips it. Messages due later are found by the
-- dispatchers' poll, as before.

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
        PERFORM pg_notify('loom_wake_{s}', coalesce(current_setting('loom.origin', true), ''));
    END IF;
    INSERT INTO {s}.messages (actor, position, message_id, frame, due_at, visible_at, deliveries)
        VALUES (p_actor, pos, p_id, p_frame, due, 0, 0);
    UPDATE {s}.mailbox SET last_position = pos, count = count + 1 WHERE actor = p_actor;
    PERFORM {s}.mb_ready(p_actor);
    RETURN pos;
END $$;
