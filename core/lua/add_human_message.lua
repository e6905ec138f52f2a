-- Store a human message and queue it for the workers, in one atomic step (one round trip),
-- after the session's backlog cap and its rate limit allowed it. Every key is the session's,
-- in its partition's hash tag (core/keys.py), so on a Redis Cluster this stays in one slot; the
-- client address's limit and the live-workers count sit elsewhere and are separate steps there
-- (core/store.py `queue_message`). On a single Redis the address's limit is checked here too
-- (KEYS[4]), first, so that it counts every attempt as the separate step does: one round trip
-- less per message.
-- Needs the preludes lib_clock.lua, lib_gcra.lua, lib_unanswered.lua, lib_answered.lua and
-- lib_history_cap.lua.
-- KEYS[1] session document, KEYS[2] the partition's request stream, KEYS[3] session rate key
-- ARGV[1] message JSON, ARGV[2] session TTL (s), ARGV[3] the `"timestamp":"..."` member in
-- ARGV[1] and ARGV[7], replaced by Redis's time (no server clock stamps a message),
-- ARGV[4] token, ARGV[5] message id, ARGV[6] events channel (sharded), ARGV[7] ack event JSON,
-- ARGV[8] messages per window per session (0 = no limit), ARGV[9] window (ms),
-- ARGV[10] history cap (0 = none), ARGV[11] unanswered messages allowed per session (0 = no
-- limit), ARGV[12] the title (JSON string) the conversation takes if it has none yet (its
-- first message's); optional: KEYS[4] the client address's rate key and ARGV[13] its
-- messages per window
-- Returns {0} the session does not exist (expired); {1, stream entry id, timestamp, owner's
-- user id or ""} stored (the caller then touches the owner's index, which sits in another
-- slot); {2, wait ms} refused by the rate limit; {4, limit} refused: the session has `limit`
-- messages waiting for a reply (nothing written on a refusal); {3} already stored (a retry);
-- {5, wait ms} refused by the address's limit (nothing written; any other answer has counted
-- the attempt against the address).
-- Idempotent: if the client retries after a lost reply, the message is not stored twice.
-- The stream is not trimmed: workers delete each entry once it is answered (XACK + XDEL), so it
-- holds only work not done yet, and no unread entry is ever trimmed away.
-- Cost without a refusal: one TIME, one JSON.GET of the fields it checks (the duplicate check
-- is a lookup in the document's `$.answered` index, lib_answered.lua, not a scan of the
-- history), one GET (or MGET, with the address's key) of the rate keys, then the writes
-- (JSON.ARRAPPEND, one JSON.MSET of the count, the index entry and a first title, EXPIRE,
-- XADD, SPUBLISH, the rate keys' SETs).
local now, stamp = now_ms_and_stamp()
local window = tonumber(ARGV[9])
local session_rate = nil
if KEYS[4] then
  local rates = redis.call('MGET', KEYS[4], KEYS[3])
  local wait, tat = gcra_check(KEYS[4], tonumber(ARGV[13]), window, now, rates[1])
  if wait > 0 then
    return {5, wait}
  end
  gcra_commit(KEYS[4], tat, now)
  session_rate = rates[2]
end
local question = answered_path(ARGV[5])
local fields = read_fields(KEYS[1], {question, '$.schema', '$.unanswered', '$.title', '$.user_id'})
if fields == nil then
  return {0}
end
if question_state(KEYS[1], fields, ARGV[5]) ~= nil then
  return {3}
end
local limit = tonumber(ARGV[11])
local waiting = unanswered_of(fields)
if limit > 0 and waiting >= limit then
  return {4, limit}
end
local wait, tat = gcra_check(KEYS[3], tonumber(ARGV[8]), window, now, session_rate)
if wait > 0 then
  return {2, wait}
end
gcra_commit(KEYS[3], tat, now)
local stamped = '"timestamp":"' .. stamp .. '"'
local function restamp(json)
  local at = string.find(json, ARGV[3], 1, true)
  if at == nil then
    return json
  end
  return string.sub(json, 1, at - 1) .. stamped .. string.sub(json, at + #ARGV[3])
end
local length = redis.call('JSON.ARRAPPEND', KEYS[1], '$.messages', restamp(ARGV[1]))[1]
if #fields['$.title'] == 0 then
  redis.call('JSON.MSET', KEYS[1], '$.unanswered', waiting + 1, KEYS[1], question, 'false',
    KEYS[1], '$.title', ARGV[12])
else
  redis.call('JSON.MSET', KEYS[1], '$.unanswered', waiting + 1, KEYS[1], question, 'false')
end
cap_history(KEYS[1], tonumber(ARGV[10]), length)
redis.call('EXPIRE', KEYS[1], ARGV[2])
local owner = fields['$.user_id'][1]
local entry = redis.call('XADD', KEYS[2], '*', 'token', ARGV[4], 'id', ARGV[5])
redis.call('SPUBLISH', ARGV[6], restamp(ARGV[7]))
return {1, entry, stamp, type(owner) == 'string' and owner or ''}
