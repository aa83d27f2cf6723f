-- Version 16: `delete` fenced, as `compact` is. `loom journal delete` deletes under the lease of
-- the actor's partition, which keeps nodes off the partition while it holds it; a delete that
-- reached the server only after that lease ran out (a stalled connection) could empty a journal
-- a node had taken and loaded meanwhile, and the node's next turn would write on top of it. Now
-- the delete checks its fence in its own transaction: 'lost', nothing deleted, once the lease
-- is no longer held. The one-argument `delete` of version 3 stays (`retire` does as it does).
-- Every statement can run again on a schema that has it.
CREATE OR REPLACE FUNCTION {s}.delete(p_actor text, p_fence_token bigint) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    IF p_fence_token IS NOT NULL AND NOT {s}.fence_held(p_actor, p_fence_token, {s}.now_ms()) THEN
        RETURN 'lost';
    END IF;
    PERFORM {s}.delete(p_actor);
    RETURN 'ok';
END $$;
