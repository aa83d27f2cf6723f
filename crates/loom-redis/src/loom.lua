-- Loom's Redis scripts. Each script is the functions its entry point reaches (cut from this file by
-- lua.rs, which needs every top-level item to be a `local function` ending with `end` alone on its
-- line) followed by one `return <entry>(KEYS, ARGV)`.
--
-- Key layout (P = prefix, T = the actor's hash tag; see keys.rs). In a store of several
-- partitions every key below but P:members, P:partitions, P:layout, P:format and P:read-mark
-- is of one partition N
-- and starts with P:{_p.N} instead of P, so that all a script of N touches is in one slot:
-- an actor's keys are P:{_p.N}:{<actor id>}:j ..., the indexes P:{_p.N}:actors,
-- P:{_p.N}:ready:K, P:{_p.N}:parked, P:{_p.N}:dl, P:{_p.N}:dlseq (the ownership partitions are
-- then the store's own), and the scripts that read or renew several partitions' keys at once
-- are listed in lib.rs (`CROSS_SLOT`).
--   P:{T}:j    stream, the journal; entry id "<seq>-0", field e = entry frame
--   P:{T}:jm   hash, journal meta: h = highest seq, t = trimmed through, d = the highest seq
--              when the journal was last deleted (no snapshot at or below it is accepted)
--   P:{T}:sn   hash, snapshot seq -> snapshot frame;  P:{T}:sz zset of kept snapshot seqs
--   P:{T}:mq   stream, the mailbox's due messages in order: the current message (cur, if any)
--              first, then the undelivered ones; fields m = envelope frame, id = message id,
--              p = position. Read with XRANGE: the meta says which entry is current, and a
--              settled message is deleted, so the next is the stream's first entry
--   P:{T}:mm   hash, mailbox meta: pos (last position), n (messages), q (undelivered in mq),
--              cur (current position, 0 if none), curid (its stream id), curmsg (its message
--              id), vis (visible at ms), dlv (its deliveries), err (last nack error); while the
--              current message is suspended on an event lane (Mailbox::suspend): wl (the lane),
--              wp and wd (the position and deliveries it was suspended at; wl is '' for a
--              sleep); c:<message id> = 1 for each message asked to be cancelled
--              (Mailbox::cancel), removed with the message; g = 1 in a mailbox of an older
--              build (3d0b8a3 and later), whose stream has a consumer group "g" that may hold
--              its current message as pending: removing that message acks it there and drops
--              g. (Builds before 3d0b8a3 made the group without marking the meta; their one
--              pending entry stays in a group nothing reads.)
--   P:{T}:md   zset, delayed messages: member = position, score = due ms
--   P:{T}:mdx  hash, delayed position -> "<message id>|<envelope frame>"
--   P:{T}:ls   string, the lease: "<owner>\n<token>", expiring with the lease
--   P:{T}:lt   counter, the last fencing token given (never deleted: tokens only grow)
--   P:{T}:i:K  string, idempotency record for key K: "P" pending or "C" .. result; with a TTL
--   P:{T}:pk   string, the actor's park record (a park frame) while it is parked; its mailbox
--              meta then has field park = 1, and its mailbox hands nothing out
--   P:actors   zset (score 0) of every actor with a journal, for listing in id order
--   P:ready:K:p  zset, actor -> ready-at ms: one member per non-empty, non-system, unparked
--              mailbox of an actor of kind K in partition p of the 32 that nodes own
--              (loom_core::partition::SHARED_STORE_PARTITIONS; Rust names the key)
--   P:parked   zset (score 0) of every parked actor, for listing in id order
--   P:dl       stream, dead letters; entry id "<id>-0", fields env, actor, id (the message's;
--              dead letters of older builds lack it), reason, dlv, at;
--              partition p of n numbers them c * n + p for its counter c = 1, 2, ... (dl_of)
--   P:dlseq    counter, the partition's last dead letter (c)
--   P:members  hash, node -> membership record (see "Membership" below)
--   P:partitions  string, the store's partition count, recorded by the first connect
--   P:{_p.N}:ob   stream, partition N's outbox (a store of several partitions): messages its
--              turns sent to actors of other partitions; entry id "<outbox seq>-0", fields to,
--              id, due (ms, 0 = now), m = envelope frame; trimmed by the relay (relay.rs)
--   P:{_p.N}:obm  hash, partition N's outbox meta: s = the last outbox seq given
--   P:{_p.N}:hw   hash, partition N's high-water marks: source partition -> the last outbox
--              seq of it the relay enqueued into N
--   P:layout   string, the layout the keys are in once a connect has moved older builds' shapes
--              (lib.rs, `LAYOUT`)
--   P:format   string, the stored format a node's connect recorded (lib.rs, `STORED_FORMAT`;
--              record_format)
--   P:read-mark  string, written only so that a wait for replicas covers what a read saw
--              (lib.rs, `replicated_as_read`)
--   P:done     pub/sub channel (not a key): "<actor>\n<idempotency key>" of each result a turn
--              records, for nodes waiting for replies (IdempotencyStore::completions)
--
-- The durability rules (D1..D21) are numbered in RELIABILITY.md; the scripts keep D5 (a turn
-- is one script), D8 (fences), D10/D11 (trims, deleted journals), D12 (parks hold mailboxes),
-- D13 (a ready index per kind and partition), D15 (checks before writes), D20/D21 (suspensions, their wake-ups
-- and cancellations), D22 (retirement).
-- Invariants, as in the embedded store (see its tables.rs): the journal holds exactly the seqs
-- t+1..h; h and t only grow; at most one message per mailbox is current, and while it is,
-- nothing else of that mailbox is handed out; P:ready mirrors each mailbox's ready-at. Every
-- script checks before it writes, so a refused request writes nothing.
--
-- Replies: { 'ok', ... } or { '<error kind>', details... }; Rust turns them into typed errors.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Leases expire at an absolute time (PEXPIREAT) that the scripts also return, so that reading it
-- back gives exactly what acquire and renew said: PEXPIRETIME on Redis 7; before it, from PTTL,
-- which may differ from it by a millisecond.
local function expire_at(key, at)
  redis.call('PEXPIREAT', key, at)
  return tostring(at)
end

local function expiry_of(key)
  local at = redis.pcall('PEXPIRETIME', key)
  if type(at) == 'number' then return at end
  return now_ms() + redis.call('PTTL', key)
end

-- When an idempotency record expires: '' for a reservation held until its message is settled
-- (no TTL; see enqueue_once).
local function record_expiry(key)
  local ttl = redis.call('PTTL', key)
  if ttl < 0 then return '' end
  return tostring(now_ms() + ttl)
end

local function num(v)
  if v == false or v == nil then return 0 end
  return tonumber(v)
end

-- Fences (rule D8) ---------------------------------------------------------------------------

-- The check every fenced write makes before it writes: the lease at `key` (the fence's: the
-- actor's own, or its partition's) is "<owner>\n<token>", and, when the fence is the
-- partition's, nobody holds the actor's own lease at `own` (nil for an own fence).
local function fence_held(key, own, owner, token)
  if redis.call('GET', key) ~= owner .. '\n' .. token then return false end
  return own == nil or redis.call('EXISTS', own) == 0
end

-- Journal ---------------------------------------------------------------------------------

-- j = { j, jm, actors, actor }
local function j_highest(j)
  local v = redis.call('HMGET', j.jm, 'h', 't')
  return num(v[1]), num(v[2])
end

-- Checks the condition; returns nil if it holds, else the refusal.
local function j_check(j, expected)
  local h = j_highest(j)
  if expected ~= h + 1 then
    return { 'conflict', tostring(h + 1) }
  end
  return nil
end

-- Appends frames as seqs expected, expected+1, ...; the condition was checked, so the highest
-- seq is expected - 1 (not read again: one command less per append).
local function j_append(j, expected, frames)
  local h = expected - 1
  if #frames == 0 then return h end
  for i, f in ipairs(frames) do
    redis.call('XADD', j.j, tostring(expected + i - 1) .. '-0', 'e', f)
  end
  local nh = expected + #frames - 1
  redis.call('HSET', j.jm, 'h', nh)
  if h == 0 then
    redis.call('ZADD', j.actors, 0, j.actor)
  end
  return nh
end

-- Mailbox ---------------------------------------------------------------------------------

-- mb = { mm, mq, md, mdx, ready, actor }; ready is the ready index of the actor's kind and
-- partition (P:ready:K:p).
--
-- Every Redis command a script calls costs Redis's one thread the call itself and Lua's
-- conversions around it, and a bank invocation ran about 60 of them: so each helper below reads
-- the mailbox meta once (HMGET of every field it needs), writes it once (one HSET, not an
-- HINCRBY per counter), and hands what it knows to mb_ready instead of letting it read again.

-- Lists, moves or drops the mailbox in its ready index (P:ready), from its meta as it is now.
-- st: the meta's { park, cur, vis, q } after the caller's writes, if the caller has them (else
-- read here). enqueued: for a message just added to the mailbox, how many undelivered
-- messages (q) it had before; false for any other change.
local function mb_ready(mb, now, enqueued, st)
  -- System mailboxes (event lanes) are read only by the invocation waiting on them.
  if string.sub(mb.actor, 1, 1) == '_' then return end
  if not st then
    local v = redis.call('HMGET', mb.mm, 'park', 'cur', 'vis', 'q')
    st = { park = v[1], cur = num(v[2]), vis = num(v[3]), q = num(v[4]) }
  end
  -- A parked actor's mailbox is held: not listed until it is unparked.
  if st.park then
    redis.call('ZREM', mb.ready, mb.actor)
    return
  end
  local at, since = nil, nil
  if st.cur ~= 0 then
    at = st.vis
  else
    if st.q > 0 then
      -- Ready since: more mail for a mailbox that is ready already keeps when it became
      -- ready (the longest-ready is served first, and Mailbox::backlog measures its wait);
      -- any other change (its current message settled or given up) makes it ready from now,
      -- or from the due time of a delayed message not yet moved into the stream, if earlier.
      -- A mailbox with nothing undelivered and nothing current was listed, if at all, only for
      -- a delayed message, which the look below finds: it is not asked.
      if enqueued and enqueued > 0 then
        since = redis.call('ZSCORE', mb.ready, mb.actor)
        if since then since = tonumber(since) end
      end
      if since and since <= now then at = since else at = now end
    end
    local d = redis.call('ZRANGE', mb.md, 0, 0, 'WITHSCORES')
    if #d > 0 then
      local due = tonumber(d[2])
      if at == nil or due < at then at = due end
    end
  end
  if at == nil then
    redis.call('ZREM', mb.ready, mb.actor)
  elseif at ~= since then
    redis.call('ZADD', mb.ready, at, mb.actor)
  end
end

-- Moves delayed messages that are due into the stream, in due order, and those due at the same
-- ms in the order they were sent (by position: the zset orders such ties by the member's text,
-- which puts 10 before 9); at most PROMOTE_MAX of them. q is how many undelivered messages the
-- stream holds. Returns q after the move.
-- A delayed message's id and frame from its mdx value, "<message id>|<frame>". A value that is
-- missing or damaged (no bar, or an id that is no message id) gives an id made from its
-- position, and what there is of the frame: it moves into the stream like any other, and the
-- lease that hands it out finds a frame that does not decode and buries it (D14). A script
-- that failed here instead would leave its writes before it in place (Redis rolls nothing
-- back): a turn sending to the actor would have journaled its entries and lost its sends.
local function mdx_parts(v, pos)
  local bar = v and string.find(v, '|', 1, true)
  local id = bar and string.sub(v, 1, bar - 1)
  if id and string.match(id, '^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$') then
    return id, string.sub(v, bar + 1)
  end
  local frame = (bar and string.sub(v, bar + 1)) or v or ''
  return string.format('00000000-0000-4000-8000-%012x', tonumber(pos) or 0), frame
end

local function mb_promote(mb, now, q)
  -- A burst coming due at once is moved a slice at a time, by the leases, turns and enqueues
  -- that find it due, so that no script holds Redis's one thread for long; the stream still
  -- holds that many undelivered messages ahead of its reader.
  local PROMOTE_MAX = 1000
  local page = redis.call('ZRANGEBYSCORE', mb.md, '-inf', now, 'WITHSCORES', 'LIMIT', 0, PROMOTE_MAX)
  if #page == 0 then return q end
  local last = page[#page]
  -- { due, position, member } of each message moved: the page's messages due before the last
  -- one's ms (all of them: the page holds the lowest scores), then the lowest positions of
  -- those due at that ms (all read, as the page may hold any of them), up to PROMOTE_MAX.
  local due = {}
  for i = 1, #page, 2 do
    if page[i + 1] ~= last then
      due[#due + 1] = { tonumber(page[i + 1]), tonumber(page[i]), page[i] }
    end
  end
  local before = #due
  local ties = {}
  for _, pos in ipairs(redis.call('ZRANGEBYSCORE', mb.md, last, last)) do
    ties[#ties + 1] = { tonumber(last), tonumber(pos), pos }
  end
  table.sort(ties, function(x, y) return x[2] < y[2] end)
  local taken = {}
  for i = 1, math.min(#ties, PROMOTE_MAX - before) do
    due[#due + 1] = ties[i]
    taken[#taken + 1] = ties[i][3]
  end
  table.sort(due, function(x, y) return x[1] < y[1] or (x[1] == y[1] and x[2] < y[2]) end)
  for _, d in ipairs(due) do
    local pos = d[3]
    local id, frame = mdx_parts(redis.call('HGET', mb.mdx, pos), pos)
    redis.call('XADD', mb.mq, '*', 'm', frame, 'id', id, 'p', pos)
    redis.call('HDEL', mb.mdx, pos)
  end
  -- Exactly the members just moved: every one due before the last's ms (the script runs
  -- alone), and those taken of the ones due at it (at most PROMOTE_MAX: unpack takes them).
  if before > 0 then redis.call('ZREMRANGEBYSCORE', mb.md, '-inf', '(' .. last) end
  redis.call('ZREM', mb.md, unpack(taken))
  q = q + #due
  redis.call('HSET', mb.mm, 'q', q)
  return q
end

local function mb_enqueue(mb, msgid, frame, due, now)
  local v = redis.call('HMGET', mb.mm, 'pos', 'n', 'q', 'park', 'cur', 'vis')
  local pos, n, q = num(v[1]) + 1, num(v[2]) + 1, num(v[3])
  local after = q
  if due > now then
    redis.call('ZADD', mb.md, due, pos)
    redis.call('HSET', mb.mdx, pos, msgid .. '|' .. frame)
    redis.call('HSET', mb.mm, 'pos', pos, 'n', n)
  else
    -- A due message goes to the end of the stream, after the delayed messages due by now
    -- (moved there first, if the meta's count says some wait: n counts the current message,
    -- the stream's undelivered ones and the delayed ones), so that the mailbox hands out in
    -- due order, as the other stores do, whenever a lease comes.
    local delayed = n - 1 - q
    if num(v[5]) ~= 0 then delayed = delayed - 1 end
    if delayed > 0 then q = mb_promote(mb, now, q) end
    if delayed > 0 and #redis.call('ZRANGEBYSCORE', mb.md, '-inf', now, 'LIMIT', 0, 1) > 0 then
      -- More were due than one move takes: this one waits among them, due now, and, as its
      -- position is the highest yet, is moved after every one of them.
      redis.call('ZADD', mb.md, now, pos)
      redis.call('HSET', mb.mdx, pos, msgid .. '|' .. frame)
      after = q
      redis.call('HSET', mb.mm, 'pos', pos, 'n', n, 'q', q)
    else
      redis.call('XADD', mb.mq, '*', 'm', frame, 'id', msgid, 'p', pos)
      after = q + 1
      redis.call('HSET', mb.mm, 'pos', pos, 'n', n, 'q', after)
    end
  end
  mb_ready(mb, now, q, { park = v[4], cur = num(v[5]), vis = num(v[6]), q = after })
  return pos
end

-- A stream entry's fields by name; none for no entry (one gone from a damaged stream).
local function mb_fields(entry)
  local f = {}
  if not entry then return f end
  local kv = entry[2]
  for i = 1, #kv, 2 do f[kv[i]] = kv[i + 1] end
  return f
end

-- The current message's stream entry.
local function mb_current_entry(mb)
  local id = redis.call('HGET', mb.mm, 'curid')
  local r = redis.call('XRANGE', mb.mq, id, id)
  return id, mb_fields(r[1])
end

-- The meta fields that settling the current message needs (mb_check, mb_remove_current).
local function mb_current(mb)
  return redis.call('HMGET', mb.mm, 'cur', 'dlv', 'curmsg', 'curid', 'n', 'q', 'park', 'g')
end

-- Checks a receipt {pos, delivery, msgid} against the current message; nil if it is current,
-- and then also the meta it read (mb_current), for mb_remove_current while it still holds.
local function mb_check(mb, pos, delivery, msgid)
  local v = mb_current(mb)
  if num(v[1]) == 0 or num(v[1]) ~= pos or num(v[2]) ~= delivery or v[3] ~= msgid then
    return { 'stale' }
  end
  return nil, v
end

-- Removes the current message (acked or buried) and moves on. v: the meta as mb_current read
-- it, if nothing has changed it since (else nil: read here). quiet: leaves the ready index to
-- the caller, who leases the mailbox next (mb_lease with its pending flag).
local function mb_remove_current(mb, now, v, quiet)
  if not v then v = mb_current(mb) end
  local id = v[4]
  -- A mailbox of an older build: its group may hold this message as pending, and nothing
  -- after it (one message is out at a time), so once acked there the group holds nothing.
  if v[8] then redis.call('XACK', mb.mq, 'g', id) end
  redis.call('XDEL', mb.mq, id)
  redis.call('HSET', mb.mm, 'cur', 0, 'n', num(v[5]) - 1)
  redis.call('HDEL', mb.mm, 'curid', 'curmsg', 'vis', 'dlv', 'err', 'wl', 'wp', 'wd', 'g', 'c:' .. (v[3] or ''))
  if not quiet then
    mb_ready(mb, now, false, { park = v[7], cur = 0, vis = 0, q = num(v[6]) })
  end
end

-- Makes the owner's message suspended on `lane` visible now, if it still is: current, at the
-- position and delivery count it was suspended at (handed out again since, it is left alone).
-- ob = { mm, ready, actor } of the owner.
-- lane false: whatever lane it is suspended on (a cancellation).
local function mb_wake(ob, lane, now)
  local v = redis.call('HMGET', ob.mm, 'wl', 'wp', 'wd', 'cur', 'dlv', 'vis')
  if not v[1] or (lane and v[1] ~= lane) then return end
  redis.call('HDEL', ob.mm, 'wl', 'wp', 'wd')
  if num(v[4]) == 0 or num(v[4]) ~= num(v[2]) or num(v[5]) ~= num(v[3]) then return end
  if num(v[6]) <= now then return end
  redis.call('HSET', ob.mm, 'vis', now)
  mb_ready(ob, now)
end

-- Moves the current message to the dead letters; returns the dead letter's id.
-- dl = { key = the stream, seq = the counter, n = the store's partitions, p = the mailbox's }:
-- partition p of n numbers its dead letters p + n, p + 2n, ..., so an id says which
-- partition's stream holds it (keys.rs `dead_letters_of`); a store of one numbers 1, 2, ...
local function mb_bury(mb, dl, reason, now)
  local _, f = mb_current_entry(mb)
  local dlv = num(redis.call('HGET', mb.mm, 'dlv'))
  local id = redis.call('INCR', dl.seq) * dl.n + dl.p
  -- An entry gone from the stream buries as an empty frame, a damaged dead letter (D14).
  redis.call('XADD', dl.key, tostring(id) .. '-0', 'env', f.m or '', 'actor', mb.actor, 'id', f.id or '', 'reason', reason, 'dlv', dlv, 'at', now)
  mb_remove_current(mb, now)
  return id
end

-- The dead-letter table of mb_bury from two keys and the n, p arguments.
local function dl_of(key, seq, n, p)
  return { key = key, seq = seq, n = tonumber(n), p = tonumber(p) }
end

-- Hands out the next due message, if any and none is out and the actor is not parked:
-- { frame, pos, deliveries, err }. pending: the caller removed the current message without
-- updating the ready index (mb_remove_current's quiet), so it is updated here whatever happens.
-- early: ms before its time a suspended current message (wp/wd still its position and
-- deliveries) may go out (LeaseOptions::early); nil or 0 for none.
local function mb_lease(mb, dl, vis, max, now, pending, early)
  while true do
    local v = redis.call('HMGET', mb.mm, 'park', 'cur', 'vis', 'dlv', 'err', 'q', 'curid', 'wp', 'wd')
    local cur = num(v[2])
    if v[1] then
      if pending then mb_ready(mb, now, false, { park = v[1] }) end
      return nil
    end
    local q = mb_promote(mb, now, num(v[6]))
    if cur ~= 0 then
      local suspended_due = early and early > 0 and num(v[3]) <= now + early
        and num(v[8]) == cur and num(v[9]) == num(v[4])
      if num(v[3]) > now and not suspended_due then
        if pending then mb_ready(mb, now, false, { cur = cur, vis = num(v[3]), q = q }) end
        return nil
      end
      local dlv = num(v[4])
      if dlv >= max then
        local reason
        if v[5] then
          reason = 'gave up after ' .. dlv .. ' deliveries; last error: ' .. v[5]
        else
          reason = 'delivered ' .. dlv .. ' times and never acked (each lease ran out)'
        end
        mb_bury(mb, dl, reason, now)
        pending = false
      else
        -- Hand the current message out again (its consumer died or gave it back).
        local r = redis.call('XRANGE', mb.mq, v[7], v[7])
        if #r == 0 then
          -- Its entry is gone from the stream (damaged, or trimmed by hand): there is nothing
          -- to hand out again, so it is buried (an empty frame, a damaged dead letter, D14),
          -- and the next one looked for.
          mb_bury(mb, dl, 'its stream entry is gone', now)
          pending = false
        else
          local f = mb_fields(r[1])
          redis.call('HSET', mb.mm, 'dlv', dlv + 1, 'vis', now + vis)
          mb_ready(mb, now, false, { cur = cur, vis = now + vis, q = q })
          return { f.m, tonumber(f.p), dlv + 1, v[5] or false }
        end
      end
    else
      if q == 0 then
        if pending then mb_ready(mb, now, false, { cur = 0, q = 0 }) end
        return nil
      end
      -- Nothing is current, so the stream holds only undelivered messages: the first is next.
      local r = redis.call('XRANGE', mb.mq, '-', '+', 'COUNT', 1)
      if #r == 0 then
        if pending then mb_ready(mb, now) end
        return nil
      end
      local entry = r[1]
      local f = mb_fields(entry)
      redis.call('HSET', mb.mm, 'cur', f.p, 'curid', entry[1], 'curmsg', f.id, 'dlv', 1, 'vis', now + vis, 'q', q - 1)
      mb_ready(mb, now, false, { cur = tonumber(f.p), vis = now + vis, q = q - 1 })
      return { f.m, tonumber(f.p), 1, false }
    end
  end
end

-- Entry points ----------------------------------------------------------------------------

-- KEYS: j, jm, actors   ARGV: actor, expected, frames...
local function append(KEYS, ARGV)
  local j = { j = KEYS[1], jm = KEYS[2], actors = KEYS[3], actor = ARGV[1] }
  local expected = tonumber(ARGV[2])
  local refused = j_check(j, expected)
  if refused then return refused end
  local frames = {}
  for i = 3, #ARGV do frames[#frames + 1] = ARGV[i] end
  return { 'ok', tostring(j_append(j, expected, frames)) }
end

-- Checks a snapshot at seq against the journal meta (jm: h highest, t trimmed, d deleted
-- through); nil if it may be saved, else the refusal.
local function s_check(jm, seq)
  local v = redis.call('HMGET', jm, 'h', 't', 'd')
  local h, t, d = num(v[1]), num(v[2]), num(v[3])
  if seq > h then return { 'ahead', tostring(h) } end
  if seq < t then return { 'behind', tostring(t) } end
  if seq <= d then return { 'deleted', tostring(d) } end
  return nil
end

local function s_save(sn, sz, seq, keep, frame)
  redis.call('HSET', sn, seq, frame)
  redis.call('ZADD', sz, seq, seq)
  while redis.call('ZCARD', sz) > keep do
    local old = redis.call('ZPOPMIN', sz)
    redis.call('HDEL', sn, old[1])
  end
end

-- Trims the journal through `through` (checked by the caller against the oldest snapshot).
local function j_trim(j, jm, through)
  local t = num(redis.call('HGET', jm, 't'))
  if through <= t then return t end
  redis.call('XTRIM', j, 'MINID', tostring(through + 1) .. '-0')
  redis.call('HSET', jm, 't', through)
  return through
end

-- KEYS: jm, sn, sz   ARGV: seq, keep, frame
local function save_snapshot(KEYS, ARGV)
  local seq, keep = tonumber(ARGV[1]), tonumber(ARGV[2])
  local refused = s_check(KEYS[1], seq)
  if refused then return refused end
  s_save(KEYS[2], KEYS[3], seq, keep, ARGV[3])
  return { 'ok' }
end

-- KEYS: j, jm, sz   ARGV: through
local function trim(KEYS, ARGV)
  local through = tonumber(ARGV[1])
  local oldest = redis.call('ZRANGE', KEYS[3], 0, 0)
  if #oldest == 0 then return { 'refused', '' } end
  if through > tonumber(oldest[1]) then return { 'refused', oldest[1] } end
  j_trim(KEYS[1], KEYS[2], through)
  return { 'ok' }
end

-- Compaction: a snapshot and the trim through the oldest kept one, in one script, fenced.
-- KEYS: j, jm, sn, sz, ls (the fence's), then the actor's own ls for a partition's fence
-- ARGV: seq, keep, frame, then owner, token of the fence (optional)
local function compact(KEYS, ARGV)
  if ARGV[4] then
    if not fence_held(KEYS[5], KEYS[6], ARGV[4], ARGV[5]) then return { 'lost' } end
  end
  local seq, keep = tonumber(ARGV[1]), tonumber(ARGV[2])
  local refused = s_check(KEYS[2], seq)
  if refused then return refused end
  s_save(KEYS[3], KEYS[4], seq, keep, ARGV[3])
  local oldest = tonumber(redis.call('ZRANGE', KEYS[4], 0, 0)[1])
  return { 'ok', tostring(j_trim(KEYS[1], KEYS[2], oldest)) }
end

-- KEYS: j, jm, sn, sz, ls (the fence's), then the actor's own ls for a partition's fence
-- ARGV: owner, token (with a fence)
local function delete(KEYS, ARGV)
  if ARGV[1] then
    if not fence_held(KEYS[5], KEYS[6], ARGV[1], ARGV[2]) then return { 'lost' } end
  end
  local h = num(redis.call('HGET', KEYS[2], 'h'))
  redis.call('DEL', KEYS[1], KEYS[3], KEYS[4])
  if h > 0 then redis.call('HSET', KEYS[2], 't', h, 'd', h) end
  return { 'ok' }
end

-- Retires an actor (Store::retire; rule D22): with the fence held, its journal's highest seq
-- still ARGV[2] and no message in its mailbox but the current one (the receipt), acks that
-- message and deletes the journal as delete does; else { 'lost' | 'stale' | 'moved' | 'busy' }
-- with nothing written.
-- KEYS: j, jm, sn, sz, ls (the fence's), mm, mq, md, mdx, ready, then the actor's own ls for a
-- partition's fence
-- ARGV: actor, highest, pos, delivery, msgid, owner, token
local function retire(KEYS, ARGV)
  if not fence_held(KEYS[5], KEYS[11], ARGV[6], ARGV[7]) then return { 'lost' } end
  local mb = { mm = KEYS[6], mq = KEYS[7], md = KEYS[8], mdx = KEYS[9], ready = KEYS[10], actor = ARGV[1] }
  local refused, current = mb_check(mb, tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5])
  if refused then return refused end
  if num(redis.call('HGET', KEYS[2], 'h')) ~= tonumber(ARGV[2]) then return { 'moved' } end
  if num(current[5]) ~= 1 then return { 'busy' } end
  mb_remove_current(mb, now_ms(), current)
  delete({ KEYS[1], KEYS[2], KEYS[3], KEYS[4] }, {})
  return { 'ok' }
end

-- KEYS: mm, mq, md, mdx, ready   ARGV: actor, msgid, frame, due
local function enqueue(KEYS, ARGV, now)
  now = now or now_ms()
  local mb = { mm = KEYS[1], mq = KEYS[2], md = KEYS[3], mdx = KEYS[4], ready = KEYS[5], actor = ARGV[1] }
  return { 'ok', tostring(mb_enqueue(mb, ARGV[2], ARGV[3], tonumber(ARGV[4]), now)) }
end

-- KEYS: mm, mq, md, mdx, ready, idem   ARGV: actor, msgid, frame, due, ttl
-- The reservation has no TTL: it is held until the turn that settles the message records the
-- result (with its TTL), however long the message waits.
local function enqueue_once(KEYS, ARGV, now)
  now = now or now_ms()
  local v = redis.call('GET', KEYS[6])
  if v then return { 'dup', v, record_expiry(KEYS[6]) } end
  redis.call('SET', KEYS[6], 'P')
  local mb = { mm = KEYS[1], mq = KEYS[2], md = KEYS[3], mdx = KEYS[4], ready = KEYS[5], actor = ARGV[1] }
  return { 'ok', tostring(mb_enqueue(mb, ARGV[2], ARGV[3], tonumber(ARGV[4]), now)) }
end

-- An event: enqueue_once on the lane (due now), and the owner's wake-up in the same script.
-- KEYS: as enqueue_once (the lane's), then the owner's mm and ready
-- ARGV: as enqueue_once (due 0), then the owner
local function enqueue_event(KEYS, ARGV)
  local now = now_ms()
  local r = enqueue_once(KEYS, ARGV, now)
  if r[1] == 'ok' then
    mb_wake({ mm = KEYS[7], ready = KEYS[8], actor = ARGV[6] }, ARGV[1], now)
  end
  return r
end

-- KEYS: mm, mq, md, mdx, ready, dl, dlseq
-- ARGV: actor, visibility, max deliveries, early (ms), n, p (dl_of)
local function lease(KEYS, ARGV, now)
  now = now or now_ms()
  local mb = { mm = KEYS[1], mq = KEYS[2], md = KEYS[3], mdx = KEYS[4], ready = KEYS[5], actor = ARGV[1] }
  local dl = dl_of(KEYS[6], KEYS[7], ARGV[5], ARGV[6])
  local r = mb_lease(mb, dl, tonumber(ARGV[2]), tonumber(ARGV[3]), now, false, tonumber(ARGV[4]))
  if not r then return { 'none' } end
  return { 'ok', r[1], tostring(r[2]), tostring(r[3]), r[4] }
end

-- KEYS: mm, mq, md, mdx, ready, dl, dlseq, and for suspend on a lane the lane's mm
-- ARGV: actor, op (ack|nack|extend|bury|suspend), pos, delivery, msgid, ms (delay or
-- visibility), text, n, p (dl_of), and for suspend the lane ('' for none)
-- suspend is a nack that an event on the lane (enqueue_event) or a cancellation ends early;
-- refused, nothing written, if the message was asked to be cancelled ('cancelled') or the lane
-- holds a message ('busy').
local function settle(KEYS, ARGV, now)
  now = now or now_ms()
  local mb = { mm = KEYS[1], mq = KEYS[2], md = KEYS[3], mdx = KEYS[4], ready = KEYS[5], actor = ARGV[1] }
  local op = ARGV[2]
  local refused, current = mb_check(mb, tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5])
  if refused then return refused end
  if op == 'ack' then
    mb_remove_current(mb, now, current)
    return { 'ok' }
  elseif op == 'suspend' then
    if redis.call('HEXISTS', mb.mm, 'c:' .. ARGV[5]) == 1 then return { 'cancelled' } end
    if ARGV[10] ~= '' and num(redis.call('HGET', KEYS[8], 'n')) > 0 then return { 'busy' } end
    redis.call('HSET', mb.mm, 'vis', now + tonumber(ARGV[6]), 'err', ARGV[7], 'wl', ARGV[10], 'wp', ARGV[3], 'wd', ARGV[4])
    mb_ready(mb, now)
    return { 'ok' }
  elseif op == 'nack' or op == 'extend' then
    redis.call('HSET', mb.mm, 'vis', now + tonumber(ARGV[6]))
    if op == 'nack' then redis.call('HSET', mb.mm, 'err', ARGV[7]) end
    mb_ready(mb, now)
    return { 'ok' }
  else
    return { 'ok', tostring(mb_bury(mb, dl_of(KEYS[6], KEYS[7], ARGV[8], ARGV[9]), ARGV[7], now)) }
  end
end

-- Marks message ARGV[2] of the mailbox as asked to be cancelled, and wakes it if it is the
-- suspended current one (Mailbox::cancel): { 'ok', position }, or { 'none' } if it is not
-- in the mailbox (nothing written).
-- KEYS: mm, mq, md, mdx, ready   ARGV: actor, msgid
local function cancel(KEYS, ARGV)
  local now = now_ms()
  local mb = { mm = KEYS[1], mq = KEYS[2], md = KEYS[3], mdx = KEYS[4], ready = KEYS[5], actor = ARGV[1] }
  local msgid = ARGV[2]
  local pos = nil
  for _, e in ipairs(redis.call('XRANGE', mb.mq, '-', '+')) do
    local f = mb_fields(e)
    if f.id == msgid then pos = f.p break end
  end
  if not pos then
    local delayed = redis.call('HGETALL', mb.mdx)
    for i = 1, #delayed, 2 do
      if string.sub(delayed[i + 1], 1, #msgid + 1) == msgid .. '|' then pos = delayed[i] break end
    end
  end
  if not pos then return { 'none' } end
  redis.call('HSET', mb.mm, 'c:' .. msgid, 1)
  if num(redis.call('HGET', mb.mm, 'cur')) == tonumber(pos) then
    mb_wake(mb, false, now)
  end
  return { 'ok', tostring(pos) }
end

-- KEYS: dl, mm, mq, md, mdx, ready, idem (the message's key, if it has one)
-- ARGV: dead letter id, actor, msgid, frame
-- The frame is the dead letter's envelope as it goes back (a new id; see Envelope::requeued).
-- Its key is held again (no TTL) until the requeued run records its result.
local function requeue(KEYS, ARGV)
  local now = now_ms()
  local id = ARGV[1] .. '-0'
  if #redis.call('XRANGE', KEYS[1], id, id) == 0 then return { 'missing' } end
  redis.call('XDEL', KEYS[1], id)
  if KEYS[7] then redis.call('SET', KEYS[7], 'P') end
  local mb = { mm = KEYS[2], mq = KEYS[3], md = KEYS[4], mdx = KEYS[5], ready = KEYS[6], actor = ARGV[2] }
  return { 'ok', tostring(mb_enqueue(mb, ARGV[3], ARGV[4], 0, now)) }
end

-- KEYS: the ready indexes asked for, grouped by kind (P:ready:K:p)
-- ARGV: limit, then how many of KEYS each kind has, in order
-- Up to limit per kind: each of its partitions is asked for its share of what is still wanted,
-- and again while some come back full, so that what most partitions lack is filled from those
-- with a backlog, and no partition's backlog hides another's ready actors.
-- Returns each key's list, oldest first: { n1, actors of key 1..., n2, ... }.
local function ready_actors(KEYS, ARGV)
  local now = now_ms()
  local limit = tonumber(ARGV[1])
  local lists = {}
  local first = 1
  for g = 2, #ARGV do
    local n = tonumber(ARGV[g])
    local want, open = limit, {}
    for i = first, first + n - 1 do
      lists[i] = {}
      open[#open + 1] = i
    end
    while want > 0 and #open > 0 do
      local share = math.ceil(want / #open)
      local full = {}
      for _, i in ipairs(open) do
        local r = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', now, 'LIMIT', #lists[i], share)
        for _, a in ipairs(r) do lists[i][#lists[i] + 1] = a end
        want = want - #r
        if #r == share then full[#full + 1] = i end
      end
      open = full
    end
    first = first + n
  end
  local out = {}
  for i = 1, #KEYS do
    out[#out + 1] = tostring(#lists[i])
    for _, a in ipairs(lists[i]) do out[#out + 1] = a end
  end
  return out
end

-- KEYS: ls (the fence's), pk, mm, ready, parked, then the actor's own ls for a partition's
-- fence   ARGV: actor, frame, then owner, token (optional)
local function park(KEYS, ARGV)
  if ARGV[3] then
    if not fence_held(KEYS[1], KEYS[6], ARGV[3], ARGV[4]) then return { 'lost' } end
  end
  redis.call('SET', KEYS[2], ARGV[2])
  redis.call('HSET', KEYS[3], 'park', 1)
  redis.call('ZREM', KEYS[4], ARGV[1])
  redis.call('ZADD', KEYS[5], 0, ARGV[1])
  return { 'ok' }
end

-- KEYS: pk, mm, mq, md, mdx, ready, parked   ARGV: actor
-- Drops the record, makes the current message (if any) visible now (its delivery count kept),
-- lists the mailbox again.
local function unpark(KEYS, ARGV)
  local now = now_ms()
  local v = redis.call('GET', KEYS[1])
  if not v then return { 'none' } end
  redis.call('DEL', KEYS[1])
  redis.call('HDEL', KEYS[2], 'park')
  redis.call('ZREM', KEYS[7], ARGV[1])
  if num(redis.call('HGET', KEYS[2], 'cur')) ~= 0 then
    redis.call('HSET', KEYS[2], 'vis', now)
  end
  local mb = { mm = KEYS[2], mq = KEYS[3], md = KEYS[4], mdx = KEYS[5], ready = KEYS[6], actor = ARGV[1] }
  mb_ready(mb, now)
  return { 'ok', v }
end

-- KEYS: a per-kind ready index of older builds (P:ready:K)   ARGV: page size
-- Moves a page of it into the per-partition indexes P:ready:K:p, in one step, so that a node
-- of this build that runs an actor meanwhile never has its entry put back (at connect; a
-- one-time upgrade on a single primary, so the names are built here). p is
-- loom_core::partition::partition_of(actor, 32): FNV-1a 64 of the id's bytes mod 32, of which
-- only the low five bits matter, and multiplying modulo 2^64 keeps the low bits a function of
-- the factors' low bits (offset basis & 31 = 5, prime & 31 = 19). A member a node of this
-- build listed already keeps its place. Returns how many it took from the old index (0: done).
local function split_ready(KEYS, ARGV)
  local page = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
  for i = 1, #page, 2 do
    local a = page[i]
    -- Every actor id has a slash; anything else was never an actor's and is dropped.
    if string.find(a, '/', 1, true) then
      local h = 5
      for j = 1, #a do
        h = bit.band(bit.bxor(h, bit.band(string.byte(a, j), 31)) * 19, 31)
      end
      redis.call('ZADD', KEYS[1] .. ':' .. h, 'NX', page[i + 1], a)
    end
    redis.call('ZREM', KEYS[1], a)
  end
  return { 'ok', #page / 2 }
end

-- The server's clock in ms, run at every connect (on every primary of a cluster): a Redis user
-- that may not run TIME, which nearly every script calls (`now_ms`), is refused there (`re`:
-- Denied), not at every request after it. KEYS: one key, for its slot only
local function clock(KEYS, ARGV)
  return { 'ok', tostring(now_ms()) }
end

-- KEYS: format   ARGV: this build's stored format
-- Records it unless a newer one (or one no build writes) is recorded: { 'ok' }, or
-- { 'newer', recorded } having written nothing.
local function record_format(KEYS, ARGV)
  local f = redis.call('GET', KEYS[1])
  if f and (tonumber(f) == nil or tonumber(f) > tonumber(ARGV[1])) then
    return { 'newer', f }
  end
  redis.call('SET', KEYS[1], ARGV[1])
  return { 'ok' }
end

-- KEYS: the legacy P:ready
-- Moves the ready index of older builds to the per-kind P:ready:K (at connect; a one-time
-- upgrade on a single primary, so the per-kind names are built here).
local function migrate_ready(KEYS, ARGV)
  local all = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  for i = 1, #all, 2 do
    local a = all[i]
    local slash = string.find(a, '/', 1, true)
    -- Every actor id has a slash; anything else was never an actor's and is dropped.
    if slash then
      redis.call('ZADD', KEYS[1] .. ':' .. string.sub(a, 1, slash - 1), all[i + 1], a)
    end
  end
  redis.call('DEL', KEYS[1])
  return { 'ok', tostring(#all / 2) }
end

-- KEYS: ls, lt   ARGV: owner, ttl
local function acquire(KEYS, ARGV)
  local now = now_ms()
  local v = redis.call('GET', KEYS[1])
  if v then
    local nl = string.find(v, '\n', 1, true)
    return { 'held', string.sub(v, 1, nl - 1), string.sub(v, nl + 1), tostring(redis.call('PTTL', KEYS[1])) }
  end
  local token = redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[1], ARGV[1] .. '\n' .. token, 'PX', ARGV[2])
  return { 'ok', tostring(token), expire_at(KEYS[1], now + tonumber(ARGV[2])) }
end

-- KEYS: ls   ARGV: owner, token, op (renew|release), ttl
local function lease_cas(KEYS, ARGV)
  local now = now_ms()
  if redis.call('GET', KEYS[1]) ~= ARGV[1] .. '\n' .. ARGV[2] then return { 'lost' } end
  if ARGV[3] == 'renew' then
    return { 'ok', expire_at(KEYS[1], now + tonumber(ARGV[4])) }
  end
  redis.call('DEL', KEYS[1])
  return { 'ok' }
end

-- KEYS: ls of each lease   ARGV: ttl, then owner, token of each lease
-- Renews every lease still held with its token: { new expiry, or '' if lost } per lease.
local function renew_many(KEYS, ARGV)
  local now = now_ms()
  local out = {}
  for i = 1, #KEYS do
    if redis.call('GET', KEYS[i]) == ARGV[2 * i] .. '\n' .. ARGV[2 * i + 1] then
      out[i] = expire_at(KEYS[i], now + tonumber(ARGV[1]))
    else
      out[i] = ''
    end
  end
  return out
end

-- KEYS: idem   ARGV: ttl
local function reserve(KEYS, ARGV)
  if redis.call('SET', KEYS[1], 'P', 'NX', 'PX', ARGV[1]) then return { 'ok' } end
  return { 'taken', redis.call('GET', KEYS[1]), record_expiry(KEYS[1]) }
end

-- KEYS: idem
local function abandon(KEYS, ARGV)
  if redis.call('GET', KEYS[1]) == 'P' then
    redis.call('DEL', KEYS[1])
    return { 'ok', '1' }
  end
  return { 'ok', '0' }
end

-- The outbox relay (relay.rs; rule D18) ------------------------------------------------------

-- In a turn, before anything else is written: appends its messages to actors of other
-- partitions (out[i].r, frames argv[first + i]: the turn's own arguments, not the global ARGV,
-- which under `batch` is the batch's) to the turn's partition's outbox,
-- numbered on from the outbox's seq (gapless). The stream refuses an id not above its last,
-- which can only fail at the first message, when nothing is written yet (the seq is raised
-- after the last).
local function ob_push(ob, out, argv, first)
  local seq = num(redis.call('HGET', ob.obm, 's'))
  for i, o in ipairs(out) do
    if o.r then
      seq = seq + 1
      redis.call('XADD', ob.ob, tostring(seq) .. '-0', 'to', o.to, 'id', o.id, 'due', tostring(o.due), 'm', argv[first + i])
    end
  end
  redis.call('HSET', ob.obm, 's', seq)
end

-- One move of the relay into partition q: enqueues each message of source partition p whose
-- outbox seq is above q's high-water mark for p, and raises the mark to the last one, so that a
-- move repeated (after a crash before the outbox was trimmed, or by a second node's relay)
-- enqueues nothing twice. Messages come in seq order.
-- KEYS: q's hw, then mm, mq, md, mdx, ready of each message's recipient
-- ARGV: p, then per message: seq, to, id, due (0: now), frame
-- Reply: { 'ok', mark after, recipients of the messages enqueued due now... }
local function relay_move(KEYS, ARGV)
  local now = now_ms()
  local p = ARGV[1]
  local mark = num(redis.call('HGET', KEYS[1], p))
  local woken = {}
  local last = mark
  for i = 0, (#ARGV - 1) / 5 - 1 do
    local a = 2 + 5 * i
    local seq = tonumber(ARGV[a])
    if seq > mark then
      local k = 2 + 5 * i
      local mb = { mm = KEYS[k], mq = KEYS[k + 1], md = KEYS[k + 2], mdx = KEYS[k + 3], ready = KEYS[k + 4], actor = ARGV[a + 1] }
      local due = tonumber(ARGV[a + 3])
      mb_enqueue(mb, ARGV[a + 2], ARGV[a + 4], due, now)
      -- Raised with each message, so that a command failing under a later one (which leaves
      -- what ran before it written) costs no message enqueued twice on the next try.
      redis.call('HSET', KEYS[1], p, seq)
      if due <= now then woken[#woken + 1] = ARGV[a + 1] end
      last = seq
    end
  end
  local r = { 'ok', tostring(last) }
  for _, a in ipairs(woken) do r[#r + 1] = a end
  return r
end

-- A turn: everything one step of an actor makes durable, all or nothing.
-- KEYS: j, jm, actors, dl, dlseq, ls (the fence's), idem,
--       mm, mq, md, mdx, ready of the actor's own mailbox (for `next`),
--       mm, mq, md, mdx, ready of the settled delivery's mailbox (its own, or one of its event
--       lanes), then mm, mq, md, mdx, ready of each outgoing message's recipient in the
--       actor's partition (ready: the index of the mailbox's kind and partition), then, if any
--       message goes to another partition, the actor's partition's ob and obm, then, for a
--       partition's fence, the actor's own ls.
-- ARGV[1]: JSON header {actor, mbox (the settled mailbox's actor), expected, n (entries),
--          fence = [owner, token, partition's (true/false)] or absent, settle = {op = ack|bury, pos, dlv, id, reason} or
--          absent, record_ttl or absent, next = [visibility, max] or absent,
--          out = [{to, id, due, r (true: to another partition, through the outbox)}, ...]}
-- ARGV[2..]: the entry frames, then the outgoing envelope frames, then the record value.
local function turn(KEYS, ARGV, now)
  now = now or now_ms()
  local h = cjson.decode(ARGV[1])
  local j = { j = KEYS[1], jm = KEYS[2], actors = KEYS[3], actor = h.actor }
  local function box(k, actor)
    return { mm = KEYS[k], mq = KEYS[k + 1], md = KEYS[k + 2], mdx = KEYS[k + 3], ready = KEYS[k + 4], actor = actor }
  end
  local own = box(8, h.actor)
  local sm = box(13, h.mbox)
  -- Where each direct send's keys start, and the outbox's (after them, if used).
  local at, ob = {}, nil
  local k = 18
  for i, o in ipairs(h.out) do
    if not o.r then at[i] = k; k = k + 5 end
  end
  for _, o in ipairs(h.out) do
    if o.r then ob = { ob = KEYS[k], obm = KEYS[k + 1] }; k = k + 2; break end
  end
  if h.fence then
    local own = nil
    if h.fence[3] then own = KEYS[k] end
    if not fence_held(KEYS[6], own, h.fence[1], h.fence[2]) then return { 'lost' } end
  end
  local refused = j_check(j, h.expected)
  if refused then return refused end
  local current
  if h.settle then
    refused, current = mb_check(sm, h.settle.pos, h.settle.dlv, h.settle.id)
    if refused then return refused end
  end
  if ob then ob_push(ob, h.out, ARGV, 1 + h.n) end
  local frames = {}
  for i = 1, h.n do frames[i] = ARGV[1 + i] end
  local highest = j_append(j, h.expected, frames)
  for i, o in ipairs(h.out) do
    if not o.r then
      mb_enqueue(box(at[i], o.to), o.id, ARGV[1 + h.n + i], o.due, now)
      -- A message to the settled mailbox itself changed its meta: read again.
      if o.to == h.mbox then current = nil end
    end
  end
  -- Acking the message of the mailbox it then leases from, the lease updates the ready index
  -- once for both.
  local pending = false
  if h.settle then
    if h.settle.op == 'ack' then
      pending = h.next ~= nil and h.mbox == h.actor
      mb_remove_current(sm, now, current, pending)
    else
      -- An empty reason is left out of the header (turn.rs).
      mb_bury(sm, dl_of(KEYS[4], KEYS[5], h.dl[1], h.dl[2]), h.settle.reason or '', now)
    end
  end
  if h.record_ttl then
    redis.call('SET', KEYS[7], ARGV[2 + h.n + #h.out], 'PX', h.record_ttl)
    -- pcall: the turn's writes are done, so a refused signal (a Redis 7 ACL user without the
    -- channel) must not make it an error; waiters find the record by their poll.
    if h.done then redis.pcall('PUBLISH', h.done[1], h.done[2]) end
  end
  local r = nil
  if h.next then
    r = mb_lease(own, dl_of(KEYS[4], KEYS[5], h.dl[1], h.dl[2]), h.next[1], h.next[2], now, pending)
  end
  if r then
    return { 'ok', tostring(highest), r[1], tostring(r[2]), tostring(r[3]), r[4] }
  end
  return { 'ok', tostring(highest) }
end

-- KEYS: sn, sz   ARGV: at_or_below
local function load_snapshot(KEYS, ARGV)
  local s = redis.call('ZREVRANGEBYSCORE', KEYS[2], ARGV[1], '-inf', 'LIMIT', 0, 1)
  if #s == 0 then return { 'none' } end
  return { 'ok', s[1], redis.call('HGET', KEYS[1], s[1]) }
end

-- KEYS: ls
local function holder(KEYS, ARGV)
  local v = redis.call('GET', KEYS[1])
  if not v then return { 'none' } end
  local nl = string.find(v, '\n', 1, true)
  return { 'ok', string.sub(v, 1, nl - 1), string.sub(v, nl + 1), tostring(expiry_of(KEYS[1])) }
end

-- KEYS: idem
local function lookup(KEYS, ARGV)
  local v = redis.call('GET', KEYS[1])
  if not v then return { 'none' } end
  return { 'ok', v, record_expiry(KEYS[1]) }
end

-- KEYS: jm, actors   ARGV: actor, through
local function begin_at(KEYS, ARGV)
  local h = num(redis.call('HGET', KEYS[1], 'h'))
  if h ~= 0 then return { 'conflict', tostring(h + 1) } end
  local t = tonumber(ARGV[2])
  if t > 0 then
    redis.call('HSET', KEYS[1], 'h', t, 't', t)
    redis.call('ZADD', KEYS[2], 0, ARGV[1])
  end
  return { 'ok' }
end

-- The cancel flag of a message id, as `messages` returns it.
local function mb_cancelling(mm, msgid)
  if redis.call('HEXISTS', mm, 'c:' .. msgid) == 1 then return '1' end
  return '0'
end

-- A page of the mailbox in position order: the `limit` lowest positions above `after`.
-- KEYS: mm, mq, md, mdx   ARGV: after, limit, from, budget, bound, inside
-- The stream holds due messages in hand-out order, not position order (a delayed message joins
-- its end when due), so it is read from its start, a page at a time. But positions are whole
-- numbers, each given once: as soon as every position from after + 1 to after + limit has been
-- found, no other can come before them, and the read stops there: the runtime's look at the
-- message it runs (the one at the stream's head, from the position before it) reads one page
-- of the stream, not the mailbox. A page of a listing whose positions are not all there (a
-- first page, after handled messages took the lowest) reads on to the stream's end.
-- One call reads at most `budget` stream entries (0: no bound), so that a mailbox of millions
-- holds Redis's one thread for a moment per call, not for seconds. A first call (from '-') that reads to the
-- end or fills the window within it answers at once, in one script as before:
--   { 'done', cur, [pos, frame, due, cancelling]... }
-- Else it answers the lowest `limit` positions above `after` (up to `bound`, if not 0) that
-- it read, without frames, and where to go on (the last stream id read):
--   { status, from, cur, [pos, stream id or '' for a delayed message, due]... }
-- status: 'more' (the budget ran out), 'end' (the stream's end was read) or 'full' (the window
-- was filled, by this call's count: a delayed message's copy moved into the stream since the
-- first call is counted again, so the caller checks).
-- and the caller goes on from there (`inside`: how many of the window its earlier calls
-- found), then fetches the chosen with `messages_frames`. Delayed messages are read at the
-- first call only.
local function messages(KEYS, ARGV)
  local after, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
  local from, budget, bound, inside = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  local first = from == '-'
  local last = after + limit
  local cur = tostring(num(redis.call('HGET', KEYS[1], 'cur')))
  -- Candidates: { pos, frame or false, due, msgid or false, stream id or false }.
  local found = {}
  local function wanted(p) return p > after and (bound == 0 or p <= bound) end
  if first then
    local delayed = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
    for i = 1, #delayed, 2 do
      local p = tonumber(delayed[i])
      if wanted(p) then
        found[#found + 1] = { p, false, delayed[i + 1], false, false }
        if p <= last then inside = inside + 1 end
      end
    end
  end
  local read, ended = 0, false
  while inside < limit do
    -- A budget of 0: no bound (a caller that needs the page in one snapshot).
    if budget > 0 and read >= budget then break end
    local count = 256
    if budget > 0 then count = math.min(256, budget - read) end
    local page = redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', count)
    read = read + #page
    for _, e in ipairs(page) do
      local f = mb_fields(e)
      local p = tonumber(f.p)
      if wanted(p) then
        if p <= last then
          inside = inside + 1
          found[#found + 1] = { p, f.m, '0', f.id, e[1] }
        else
          -- Its frame is read again if it is chosen: most of these are not.
          found[#found + 1] = { p, false, '0', false, e[1] }
        end
      end
    end
    if #page > 0 then from = '(' .. page[#page][1] end
    if #page < count then
      ended = true
      break
    end
  end
  table.sort(found, function(x, y) return x[1] < y[1] end)
  if not (first and (ended or inside >= limit)) then
    local status = 'more'
    if ended then
      status = 'end'
    elseif inside >= limit then
      status = 'full'
    end
    local out = { status, from, cur }
    for i = 1, math.min(#found, limit) do
      local c = found[i]
      out[#out + 1] = tostring(c[1])
      out[#out + 1] = c[5] or ''
      out[#out + 1] = c[3]
    end
    return out
  end
  local out = { 'done', cur }
  for i = 1, math.min(#found, limit) do
    local c = found[i]
    local frame, msgid = c[2], c[4]
    if not frame and c[5] then
      local f = mb_fields(redis.call('XRANGE', KEYS[2], c[5], c[5])[1])
      frame, msgid = f.m, f.id
    elseif not frame then
      msgid, frame = mdx_parts(redis.call('HGET', KEYS[4], tostring(c[1])), c[1])
    end
    out[#out + 1] = tostring(c[1])
    out[#out + 1] = frame
    out[#out + 1] = c[3]
    out[#out + 1] = mb_cancelling(KEYS[1], msgid)
  end
  return out
end

-- The messages a `messages` listing of several calls chose, with their frames: what is there
-- now of each (one settled meanwhile is left out; a delayed one moved into the stream since is
-- left out and said, `moved`, so that the caller picks the page again).
-- KEYS: mm, mq, mdx   ARGV: [pos, stream id or '' for a delayed message, due]...
-- Reply: { 'moved' or '', cur, [pos, frame, due, cancelling]... }
local function messages_frames(KEYS, ARGV)
  local out = { '', tostring(num(redis.call('HGET', KEYS[1], 'cur'))) }
  for i = 1, #ARGV, 3 do
    local frame, msgid
    if ARGV[i + 1] ~= '' then
      local r = redis.call('XRANGE', KEYS[2], ARGV[i + 1], ARGV[i + 1])
      if #r > 0 then
        local f = mb_fields(r[1])
        frame, msgid = f.m, f.id
      end
    else
      local v = redis.call('HGET', KEYS[3], ARGV[i])
      if v then
        msgid, frame = mdx_parts(v, ARGV[i])
      else
        out[1] = 'moved'
      end
    end
    if frame then
      out[#out + 1] = ARGV[i]
      out[#out + 1] = frame
      out[#out + 1] = ARGV[i + 2]
      out[#out + 1] = mb_cancelling(KEYS[1], msgid)
    end
  end
  return out
end

-- Membership ---------------------------------------------------------------------------------
-- P:members  hash, node -> "<incarnation>|<joined ms>|<last beat ms>|<ttl ms>|<kinds, comma-separated>"

-- The record's fields, or nothing if it is not one heartbeat can have written: the incarnation
-- a u64 (as Rust reads it), the times and the ttl numbers Lua holds exactly (15 digits).
local function member_fields(v)
  local inc, joined, beat, ttl = string.match(v, '^(%d+)|(%d+)|(%d+)|(%d+)|')
  if not inc or #inc > 20 or (#inc == 20 and inc > '18446744073709551615')
    or #joined > 15 or #beat > 15 or #ttl > 15 then
    return nil
  end
  return inc, tonumber(joined), tonumber(beat), tonumber(ttl)
end

-- KEYS: members   ARGV: node, incarnation, ttl ms, kinds, forget after (ttls)
-- { 'ok', joined, now } having written the node's record and deleted the forgotten ones, or
-- { 'taken', incarnation, remaining ms } having written nothing (see Membership::heartbeat).
local function heartbeat(KEYS, ARGV)
  local now = now_ms()
  local node, inc, ttl, forget = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[5])
  local joined = now
  local own = redis.call('HGET', KEYS[1], node)
  -- A record of this name that no heartbeat wrote (mangled by hand, say) announces no live
  -- process: it is written over.
  local oinc, ojoined, obeat, ottl
  if own then oinc, ojoined, obeat, ottl = member_fields(own) end
  if oinc then
    if oinc == inc then
      joined = ojoined
    elseif obeat + ottl > now then
      return { 'taken', oinc, tostring(obeat + ottl - now) }
    end
  end
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    local finc, _, fbeat, fttl = member_fields(all[i + 1])
    -- Another name's record that no heartbeat wrote is deleted with the forgotten: it is no
    -- live node, and kept it failed every node's heartbeat and roster read.
    if all[i] ~= node and (not finc or fbeat + fttl * forget <= now) then
      redis.call('HDEL', KEYS[1], all[i])
    end
  end
  redis.call('HSET', KEYS[1], node,
    inc .. '|' .. tostring(joined) .. '|' .. tostring(now) .. '|' .. tostring(ttl) .. '|' .. ARGV[4])
  return { 'ok', tostring(joined), tostring(now) }
end

-- KEYS: members   ARGV: node, incarnation   { 'ok', '1' } if it removed the record, else '0'
local function leave(KEYS, ARGV)
  local own = redis.call('HGET', KEYS[1], ARGV[1])
  if own and member_fields(own) == ARGV[2] then
    redis.call('HDEL', KEYS[1], ARGV[1])
    return { 'ok', '1' }
  end
  return { 'ok', '0' }
end

-- KEYS: members   { now, node, record, node, record, ... }
local function members(KEYS, ARGV)
  local out = { tostring(now_ms()) }
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all do out[#out + 1] = all[i] end
  return out
end

-- Group commit (group.rs): several requests of the hot path's entry points (the table below),
-- of any actors, in one call. Each runs as its own script would, one after another in order, and has its own reply: a refused request
-- writes nothing, and one whose Redis command fails (out of memory, a read-only replica) gets
-- that error as its reply, keeping what it wrote before it as it would alone, while the others
-- go on.
-- ARGV: n, then per request its entry's name, key count and argument count, then
--       every request's arguments in order.
-- KEYS: every request's keys, in order.
-- Reply: one reply per request: its own, or { 'error', message } for a failed one (not an
-- error reply, which would fail the whole call in the client).
local function batch(KEYS, ARGV)
  local entries = {
    append = append, turn = turn, enqueue = enqueue, enqueue_once = enqueue_once, lease = lease,
    settle = settle, lookup = lookup
  }
  local n = tonumber(ARGV[1])
  local k, a = 0, 1 + 3 * n
  local out = {}
  -- One clock reading for the whole batch: it runs alone, so its requests see one moment, as
  -- each would alone, with one command less per request.
  local now = now_ms()
  for r = 1, n do
    local at = 2 + 3 * (r - 1)
    local entry = entries[ARGV[at]]
    local nk, na = tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
    local keys, args = {}, {}
    for i = 1, nk do keys[i] = KEYS[k + i] end
    for i = 1, na do args[i] = ARGV[a + i] end
    k, a = k + nk, a + na
    local ok, reply = pcall(entry, keys, args, now)
    if ok then
      out[r] = reply
    else
      if type(reply) == 'table' and reply.err then reply = reply.err end
      out[r] = { 'error', (string.gsub(tostring(reply), '[\r\n]', ' ')) }
    end
  end
  return out
end
