-- Version 9: a lease may hand out a suspended message a little before its time
-- (LeaseOptions::early), so that an actor warmed just before its sleep ends holds its message
-- at the moment itself and waits out the rest in memory, instead of writing a lease then.
-- Version 7's three-argument `lease` stays for nodes of older builds; every statement can run
-- again on a schema that has it.

-- As version 7's `lease`, and: a current message that is suspended (the mailbox's wake mark
-- still names its position and deliveries) and becomes visible within p_early ms is handed out
-- now. The look that finds nothing is still without a lock; the early case checks the mark
-- under the mailbox row's lock (SKIP LOCKED: a mailbox another transaction holds is skipped, as
-- mb_lease skips it), brings the message's time forward to now, and leases as any due message
-- (at the real now: a message buried for its deliveries leaves the next one to its own time).
CREATE OR REPLACE FUNCTION {s}.lease(p_actor text, p_vis bigint, p_max integer, p_early bigint,
    OUT frame bytea, OUT pos bigint, OUT dlv integer, OUT err text)
LANGUAGE plpgsql AS $$
DECLARE now bigint := {s}.now_ms(); ready bigint; w record; v bigint;
BEGIN
    SELECT b.ready_at INTO ready FROM {s}.mailbox AS b WHERE b.actor = p_actor;
    IF ready IS NULL THEN RETURN; END IF;
    IF ready > now THEN
        IF p_early <= 0 OR ready > now + p_early THEN RETURN; END IF;
        SELECT current, wake_position, wake_deliveries INTO w FROM {s}.mailbox
            WHERE actor = p_actor FOR UPDATE SKIP LOCKED;
        IF NOT FOUND OR w.current = 0 OR w.wake_position IS DISTINCT FROM w.current THEN RETURN; END IF;
        IF EXISTS (SELECT 1 FROM {s}.parked WHERE actor = p_actor) THEN RETURN; END IF;
        SELECT m.visible_at INTO v FROM {s}.messages AS m
            WHERE m.actor = p_actor AND m.position = w.current AND m.deliveries = w.wake_deliveries;
        IF NOT FOUND OR v > now + p_early THEN RETURN; END IF;
        UPDATE {s}.messages SET visible_at = now WHERE actor = p_actor AND position = w.current;
    END IF;
    SELECT m.frame, m.pos, m.dlv, m.err INTO frame, pos, dlv, err
        FROM {s}.mb_lease(p_actor, p_vis, p_max, now) AS m;
END $$;
