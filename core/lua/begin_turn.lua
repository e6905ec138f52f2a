-- What the worker reads for each turn, in one round trip: a session's newest messages and its
-- latest stop time; with ARGV[2], also one more generation attempt counted for the message it
-- expects to answer (the poison-message guard, see SessionStore.begin_attempt), so the common
-- turn needs no round trip of its own for the count; with KEYS[4], also the session's lease
-- taken for the worker (worker/leases.py), so the first read of an entry needs no round trip
-- of its own for the lease either.
-- KEYS[1] session document, KEYS[2] the session's stop time, KEYS[3] the expected message's
-- generation-attempt counter, optional KEYS[4] the session's lease
-- ARGV[1] how many of the newest messages, ARGV[2] the counter's increment ("" = count
-- nothing), ARGV[3] the counter's TTL (s); with KEYS[4]: ARGV[4] the lease's owner, ARGV[5]
-- the lease (ms)
-- Returns nil when the session does not exist (nothing counted, no lease taken); 0 when
-- another owner holds the lease (nothing counted, nothing read); else {the window (JSON text
-- `{"$.messages[-N:]": [the messages], "$.unanswered": [count]}`), the stop time (epoch
-- microseconds) or nil, the count after the increment or nil}.
-- The window and the count of messages waiting for a reply (lib_unanswered.lua) in one
-- JSON.GET of two paths: its answer is one JSON object, path -> matches, parsed by the
-- caller, who reads more when the window turns out to miss a waiting message.
local messages = redis.call('JSON.GET', KEYS[1], '$.messages[-' .. ARGV[1] .. ':]', '$.unanswered')
if not messages then
  return nil
end
if KEYS[4] then
  -- The holder before this call: none (taken now), or this owner (a retry of a call whose
  -- answer was lost: taken, not busy), or another worker.
  local holder = redis.call('SET', KEYS[4], ARGV[4], 'NX', 'PX', ARGV[5], 'GET')
  if holder and holder ~= ARGV[4] then
    return 0
  end
end
-- The stop time and the count in one MGET, the new count written with its TTL in one SET.
local read = redis.call('MGET', KEYS[2], KEYS[3])
local count = false
if ARGV[2] ~= '' then
  count = (tonumber(read[2]) or 0) + tonumber(ARGV[2])
  redis.call('SET', KEYS[3], count, 'EX', ARGV[3])
end
return {messages, read[1], count}
