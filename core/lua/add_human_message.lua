-- Store a human message and queue it for the workers, in one atomic step (one round trip),
-- after the session's backlog cap and the session's and the client address's rate limits
-- allowed it.
-- Needs the preludes lib_clock.lua, lib_gcra.lua, lib_history_cap.lua and lib_unanswered.lua.
-- KEYS[1] session document, KEYS[2] request stream, KEYS[3] session rate key,
-- KEYS[4] address rate key, KEYS[5] live-workers sorted set
-- ARGV[1] message JSON, ARGV[2] session TTL (s), ARGV[3] the `"timestamp":"..."` member in
-- ARGV[1] and ARGV[7], replaced by Redis's time (no server clock stamps a message),
-- ARGV[4] token, ARGV[5] message id, ARGV[6] events channel, ARGV[7] ack event JSON,
-- ARGV[8] messages per window per session (0 = no limit), ARGV[9] per address (0 = no limit),
-- ARGV[10] window (ms), ARGV[11] history cap (0 = none), ARGV[12] worker lease (ms),
-- ARGV[13] unanswered messages allowed per session (0 = no limit), ARGV[14] the title (JSON
-- string) the conversation takes if it has none yet (its first message's)
-- Returns {0} the session does not exist (expired); {1, stream entry id, live workers,
-- timestamp, owner's user id or ""} stored (the caller then touches the owner's index, which
-- sits in another slot); {2, wait ms} refused by a rate limit; {4, limit} refused: the session has
-- `limit` messages waiting for a reply (nothing written on a refusal); {3} already stored (a
-- retry). Idempotent: if the client retries after a lost reply, the message is not stored twice.
-- The stream is not trimmed: workers delete each entry once it is answered (XACK + XDEL), so it
-- holds only work not done yet, and no unread entry is ever trimmed away.
-- Cost without a refusal: one JSON.GET of the fields it checks, one TIME, one MGET of both
-- rate keys, then the writes (JSON.ARRAPPEND, JSON.MSET, EXPIRE, XADD, PUBLISH, the rate keys'
-- SETs) and ZCOUNT.
local duplicate = '$.messages[?(@.id=="' .. ARGV[5] .. '")].id'
local fields = read_fields(KEYS[1], {duplicate, '$.unanswered', '$.title', '$.user_id'})
if fields == nil then
  return {0}
end
if #fields[duplicate] > 0 then
  return {3}
end
local limit = tonumber(ARGV[13])
local waiting = unanswered_of(fields)
if limit > 0 and waiting >= limit then
  return {4, limit}
end
local now, stamp = now_ms_and_stamp()
local window = tonumber(ARGV[10])
local per_session, per_address = tonumber(ARGV[8]), tonumber(ARGV[9])
local stored = {nil, nil}
if per_session > 0 and per_address > 0 then
  stored = redis.call('MGET', KEYS[3], KEYS[4])
end
local session_wait, session_tat = gcra_check(KEYS[3], per_session, window, now, stored[1])
local address_wait, address_tat = gcra_check(KEYS[4], per_address, window, now, stored[2])
if session_wait > 0 or address_wait > 0 then
  return {2, math.max(session_wait, address_wait)}
end
gcra_commit(KEYS[3], session_tat, now)
gcra_commit(KEYS[4], address_tat, now)
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
  redis.call('JSON.MSET', KEYS[1], '$.unanswered', waiting + 1, KEYS[1], '$.title', ARGV[14])
else
  redis.call('JSON.MSET', KEYS[1], '$.unanswered', waiting + 1)
end
cap_history(KEYS[1], tonumber(ARGV[11]), length)
redis.call('EXPIRE', KEYS[1], ARGV[2])
local owner = fields['$.user_id'][1]
local entry = redis.call('XADD', KEYS[2], '*', 'token', ARGV[4], 'id', ARGV[5])
redis.call('PUBLISH', ARGV[6], restamp(ARGV[7]))
local alive = redis.call('ZCOUNT', KEYS[5], now - tonumber(ARGV[12]), '+inf')
return {1, entry, alive, stamp, type(owner) == 'string' and owner or ''}
