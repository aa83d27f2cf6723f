-- Version 15: `reserve` looks again when the record it collided with is gone before it could
-- lock it. Its insert did nothing for a record already there; if that record had expired,
-- `purge_expired` (which every runtime runs) could delete it before the `SELECT … FOR UPDATE`
-- that followed, which then found nothing, and `reserve` answered "taken, pending" with no
-- expiry: the client failed to decode the missing expiry (a panic inside `ask`, `send` or
-- `deliver_event`), and had it not, the caller would have waited for a reply to a message
-- never sent. Now the insert is tried again until it inserts or the lock finds the record.
-- Every statement can run again on a schema that has it.
CREATE OR REPLACE FUNCTION {s}.reserve(p_actor text, p_key text, p_ttl bigint,
    OUT reserved boolean, OUT res bytea, OUT expires bigint)
LANGUAGE plpgsql AS $$
DECLARE now bigint := {s}.now_ms(); r record;
BEGIN
    LOOP
        INSERT INTO {s}.idempotency (actor, key, result, expires_at) VALUES (p_actor, p_key, NULL, now + p_ttl)
            ON CONFLICT (actor, key) DO NOTHING;
        IF FOUND THEN reserved := true; expires := now + p_ttl; RETURN; END IF;
        SELECT * INTO r FROM {s}.idempotency WHERE actor = p_actor AND key = p_key FOR UPDATE;
        IF FOUND THEN
            IF r.expires_at <= now THEN
                UPDATE {s}.idempotency SET result = NULL, expires_at = now + p_ttl WHERE actor = p_actor AND key = p_key;
                reserved := true; expires := now + p_ttl; RETURN;
            END IF;
            reserved := false; res := r.result; expires := r.expires_at; RETURN;
        END IF;
        -- Deleted between the insert and the lock (an expired record purged): again.
    END LOOP;
END $$;

-- Indexes in byte order for the listings (`list_actors`, `mailboxes`, the parked listing: `loom
-- journal ls`, `export`, `migrate`, `cluster status`, `parked list`), which page with
-- `actor COLLATE "C" > $1 ORDER BY actor COLLATE "C" LIMIT n` so that every backend lists in
-- the same order. The primary keys are in the database's collation and cannot serve them, so
-- each page sorted the whole table: listing a million actors read it a thousand times. The
-- actor column never changes, so updates of these rows stay HOT. Built in the migration's
-- transaction: on a large store that holds writes to the three tables for as long as the
-- build takes.
CREATE INDEX IF NOT EXISTS journal_meta_actor_bytes ON {s}.journal_meta (actor COLLATE "C");
CREATE INDEX IF NOT EXISTS mailbox_actor_bytes ON {s}.mailbox (actor COLLATE "C");
CREATE INDEX IF NOT EXISTS parked_actor_bytes ON {s}.parked (actor COLLATE "C");
