-- Version 14: `acquire` answers "held" without waiting for the lease row's lock. Version 1's
-- `acquire` locked the row FOR UPDATE before it looked at the lease, so a node asking for a
-- partition another node works waited behind every turn in flight (each holds the partition's
-- lease row FOR KEY SHARE, version 10), and behind the next ones, which take KEY SHARE past a
-- waiting FOR UPDATE: a steady stream of turns could hold the answer "held" off until the
-- statement timed out (10 s), stalling the asking node's ownership loop. Now a lease that is
-- live by its committed row is answered as held at once, with no lock (a renewal only moves
-- its expiry later, and a release in flight makes it free at most a look later, when the node
-- asks again). Only a free or expired lease is locked FOR UPDATE before it is taken, as
-- before, so a lease still changes hands only after every turn that checked it has ended.
-- Every statement can run again on a schema that has it.
CREATE OR REPLACE FUNCTION {s}.acquire(p_actor text, p_owner text, p_ttl bigint,
    OUT ok boolean, OUT holder text, OUT tok bigint, OUT expires bigint)
LANGUAGE plpgsql AS $$
DECLARE now bigint := {s}.now_ms(); r record;
BEGIN
    SELECT * INTO r FROM {s}.leases WHERE actor = p_actor;
    IF FOUND AND r.owner IS NOT NULL AND r.expires_at > now THEN
        ok := false; holder := r.owner; tok := r.token; expires := r.expires_at; RETURN;
    END IF;
    INSERT INTO {s}.leases (actor, owner, token, expires_at) VALUES (p_actor, NULL, 0, 0) ON CONFLICT DO NOTHING;
    SELECT * INTO r FROM {s}.leases WHERE actor = p_actor FOR UPDATE;
    -- Looked at again under the lock: another node may have taken it meanwhile, or renewed
    -- it in time.
    now := {s}.now_ms();
    IF r.owner IS NOT NULL AND r.expires_at > now THEN
        ok := false; holder := r.owner; tok := r.token; expires := r.expires_at; RETURN;
    END IF;
    UPDATE {s}.leases SET owner = p_owner, token = r.token + 1, expires_at = now + p_ttl WHERE actor = p_actor;
    ok := true; holder := p_owner; tok := r.token + 1; expires := now + p_ttl;
END $$;
